"""What every task module shares: the retry rule and the logger."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from coder_stack.errors import is_retriable


def only_retriable(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry only what a retry may fix (a :class:`RetriableError`).

    The async task engine passes ``Failed(data=<the exception>)``; there ``state.result()`` would only
    return an un-awaited coroutine (so nothing was ever retried): read the exception from ``state.data``.
    """
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return is_retriable(data)
    try:
        outcome = state.result()
    except Exception as e:  # the task's own exception, re-raised by Prefect
        return is_retriable(e)
    if inspect.iscoroutine(outcome):
        outcome.close()
    return False


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a flow or task run; a plain logger when called through ``.fn()``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("coder_stack.tasks")


def retrying(*delays_s: float) -> dict[str, Any]:
    """The options every task shares: no result cache, and a retry after each delay in ``delays_s`` for
    :class:`~coder_stack.errors.RetriableError` only."""
    return {
        "cache_policy": NO_CACHE,
        "retries": len(delays_s),
        "retry_delay_seconds": list(delays_s),
        "retry_condition_fn": only_retriable,
    }
