"""The two LiteLLM classes a callback module imports from the proxy's own environment, for the simulated proxy.

A hook module runs inside the LiteLLM image, where ``litellm`` is installed; the simulator has no ``litellm``
(the project never installs it). While a callback module is imported (:func:`litellm_importable`), these stand
in for ``litellm.integrations.custom_logger.CustomLogger`` and ``litellm.proxy._types.ProxyException``, so the
module defines the classes it would in the pod, and the stand-in answers a ``ProxyException`` as the real proxy
does (:func:`is_proxy_exception`). The names are in ``sys.modules`` only during that import.

``ProxyException`` keeps the real class's constructor and attributes (1.108.7, ``litellm/proxy/_types.py``):
``message``, ``type``, ``param``, ``code`` (a string: the status), ``openai_code``, ``headers``,
``provider_specific_fields``. ``CustomLogger``'s hooks are the real base class's no-ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any


class CustomLogger:
    """LiteLLM's callback base class: every hook a no-op (the proxy calls only those a subclass defines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> Any:
        return None

    async def async_post_call_failure_hook(self, *args: Any, **kwargs: Any) -> Any:
        return None


class ProxyException(Exception):
    def __init__(
        self,
        message: str,
        type: str,
        param: str | None,
        code: int | str | None = None,
        headers: dict[str, str] | None = None,
        openai_code: str | None = None,
        provider_specific_fields: dict | None = None,
    ) -> None:
        self.message = str(message)
        super().__init__(self.message)
        self.type = type
        self.param = param
        self.openai_code = openai_code or code
        self.code = str(code)
        self.headers = {k: str(v) for k, v in (headers or {}).items()}
        self.provider_specific_fields = provider_specific_fields


def is_proxy_exception(exc: BaseException) -> bool:
    """A LiteLLM ProxyException (this stand-in's, or the real class if a hook brought its own litellm)."""
    return any(c.__name__ == "ProxyException" for c in type(exc).__mro__) and hasattr(exc, "code")


@contextlib.contextmanager
def litellm_importable() -> Iterator[None]:
    """``litellm.integrations.custom_logger`` and ``litellm.proxy._types`` importable while the block runs, unless
    a real ``litellm`` is (then nothing is added)."""
    if "litellm" in sys.modules or importlib.util.find_spec("litellm") is not None:
        yield
        return
    mods = {
        name: types.ModuleType(name)
        for name in ("litellm", "litellm.integrations", "litellm.integrations.custom_logger", "litellm.proxy",
                     "litellm.proxy._types")
    }  # fmt: skip
    mods["litellm.integrations.custom_logger"].CustomLogger = CustomLogger  # type: ignore[attr-defined]
    mods["litellm.proxy._types"].ProxyException = ProxyException  # type: ignore[attr-defined]
    for parent, child in (("litellm", "integrations"), ("litellm", "proxy")):
        setattr(mods[parent], child, mods[f"{parent}.{child}"])
    mods["litellm.integrations"].custom_logger = mods["litellm.integrations.custom_logger"]  # type: ignore[attr-defined]
    mods["litellm.proxy"]._types = mods["litellm.proxy._types"]  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name in mods:
            sys.modules.pop(name, None)
