"""The one state object every concern of the stand-in is handed: the proxy's settings, its database
(``SimServices.litellm_db``, LiteLLM's Postgres, which survives a pod restart) and its in-memory view."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

import aiohttp

from simstack.standins import ContainerRun, SimServices
from simstack.standins.litellm import models
from simstack.standins.litellm.callbacks import Callbacks
from simstack.standins.litellm.config import read_config, resolve_env
from simstack.standins.litellm.shape import now


@dataclass
class ProxyState:
    run: ContainerRun
    services: SimServices
    env: dict[str, str]
    general: dict[str, Any]
    master_key: str | None
    salt: str
    store_model_in_db: bool
    config_deployments: list[models.Deployment]
    db: dict[str, Any]
    pending: list[tuple[float, str | None, float, dict[str, Any] | None]]  # (due, token, cost, log row)
    mem_spend: dict[str, float]  # in-memory view (cache) of not-yet-written spend
    rr: itertools.count[int]
    session: aiohttp.ClientSession | None
    started: dt.datetime
    callbacks: Callbacks

    @classmethod
    def from_run(cls, run: ContainerRun, services: SimServices) -> ProxyState:
        env = dict(run.env)
        config_path, cfg = read_config(run)
        env.update({k: str(v) for k, v in (cfg.get("environment_variables") or {}).items()})
        general = resolve_env(cfg.get("general_settings") or {}, env)
        master_key: str | None = (
            general.get("master_key") or env.get("LITELLM_MASTER_KEY") or env.get("PROXY_MASTER_KEY") or None
        )
        salt = env.get("LITELLM_SALT_KEY") or master_key or "litellm"
        store_model_in_db = bool(general.get("store_model_in_db")) or env.get("STORE_MODEL_IN_DB", "").lower() in (
            "true",
            "1",
        )
        config_deployments = [models.config_deployment(m, env) for m in cfg.get("model_list") or []]
        settings = cfg.get("litellm_settings") or {}
        # loaded last: a callback that cannot be loaded stops the proxy's start (callbacks.py)
        callbacks = Callbacks.load(run, settings.get("callbacks"), config_path, services.pod_access)
        db = services.litellm_db
        db.setdefault("keys", {})
        db.setdefault("deleted_keys", {})
        db.setdefault("models", [])
        db.setdefault("spend_logs", [])
        return cls(
            run=run,
            services=services,
            env=env,
            general=general,
            master_key=master_key,
            salt=salt,
            store_model_in_db=store_model_in_db,
            config_deployments=config_deployments,
            db=db,
            pending=[],
            mem_spend={},
            rr=itertools.count(),
            session=None,
            started=now(),
            callbacks=callbacks,
        )
