"""The proxy's configuration as the real image finds and reads it (``--config``, ``CONFIG_FILE_PATH`` or a
mounted config file; ``os.environ/X`` references)."""

from __future__ import annotations

import posixpath
from typing import Any

import yaml

from simstack.standins import ContainerRun

CONFIG_NAMES = ("proxy_config.yaml", "config.yaml", "config.yml", "litellm_config.yaml", "proxy_server_config.yaml")


def resolve_env(value: Any, env: dict[str, str]) -> Any:
    """LiteLLM's ``os.environ/NAME`` references, recursively."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        return env.get(value[len("os.environ/") :])
    if isinstance(value, dict):
        return {k: resolve_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, env) for v in value]
    return value


def find_config(run: ContainerRun) -> dict[str, Any]:
    return read_config(run)[1]


def read_config(run: ContainerRun) -> tuple[str | None, dict[str, Any]]:
    """The config file's path in the pod (None when there is none) and its content."""
    path: str | None = None
    args = run.args
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    path = path or run.env.get("CONFIG_FILE_PATH")
    text: str | None = None
    if path is not None:
        text = run.files.get(path) or run.files.get(posixpath.normpath(path))
        if text is None:
            raise FileNotFoundError(f"Config file not found: {path}")
    else:
        for p, content in run.files.items():
            if posixpath.basename(p) in CONFIG_NAMES:
                path, text = p, content
                break
    if text is None:
        return None, {}
    cfg = yaml.safe_load(text) or {}
    if not isinstance(cfg, dict):
        raise ValueError("LiteLLM config must be a mapping")
    return path, cfg
