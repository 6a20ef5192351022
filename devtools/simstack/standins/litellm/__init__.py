"""Stand-in for the LiteLLM proxy (image ``ghcr.io/berriai/litellm``), following ``shared/reference/litellm.md``.

Reads, like the real proxy: ``--config <path>`` (or env ``CONFIG_FILE_PATH``, else a mounted
``proxy_config.yaml``/``config.yaml``) with ``model_list`` and ``general_settings``; ``os.environ/X`` values
resolved from the container env; master key from ``general_settings.master_key``, env ``LITELLM_MASTER_KEY``
or ``PROXY_MASTER_KEY``; ``store_model_in_db`` from ``general_settings`` or env ``STORE_MODEL_IN_DB``.

All persistent state (virtual keys with their spend, models added with ``/model/new``) lives in
``SimServices.litellm_db`` (LiteLLM's Postgres), so it survives a pod restart. Spend of a call reaches the
database ``spend_write_delay_s * time_scale`` seconds later (the batched write); budget checks use the
proxy's in-memory view, which includes not-yet-written spend.

One module per concern, each handed the one :class:`~simstack.standins.litellm.state.ProxyState`:

- ``config``: finding and reading the config file; ``state``: the state object built from it;
- ``auth``: the caller (master or virtual key) and its model scope;
- ``keys``: the virtual-key store; ``models``: deployments, aliases and model registration;
- ``spend``: costs, the batched write, budgets and the spend logs;
- ``routing``: a data-plane call routed to a vLLM backend; ``reshape``: its answer, stream and headers;
- ``errors``: LiteLLM's error object and the shaped upstream errors; ``shape``: the field model and times;
- ``app``: the HTTP app and its thin handlers.
"""

from __future__ import annotations

from simstack.standins import FACTORIES
from simstack.standins.litellm.app import IMAGE, LiteLLMProxy, normalize_route, start_litellm
from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.reshape import VERSION
from simstack.standins.litellm.shape import mold

__all__ = ["IMAGE", "VERSION", "LiteLLMProxy", "ProxyError", "mold", "normalize_route", "start_litellm"]

FACTORIES[IMAGE] = start_litellm
