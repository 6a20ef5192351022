"""kubernetes_asyncio logs every API response body at DEBUG. Reading or writing a Secret through the project's
client against the simulated API server must not put its value, plain or base64, into any log record."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import pytest
from pydantic import SecretStr
from simstack.stack import SimStack

from coder_stack.kubernetes.client import ClusterTarget, open_api, read_secret, write_secret_keys

VALUE = "sk-log-redaction-known-value-0123456789abcdef"
NEW_VALUE = "plain-secret-without-a-key-shape-4242"


def everything_logged(records: list[logging.LogRecord]) -> str:
    out = []
    for r in records:
        out.append(r.getMessage())
        out.append(repr(r.args))
        out.append(repr(r.msg))
    return "\n".join(out)


async def test_a_secret_read_and_written_at_debug_leaves_no_value_in_any_log_record(
    make_sim: Callable[..., SimStack], caplog: pytest.LogCaptureFixture
) -> None:
    sim = make_sim()
    master = sim.secrets["master_key"]
    with caplog.at_level(logging.DEBUG, logger="kubernetes_asyncio"):
        async with open_api(ClusterTarget(kubeconfig=str(sim.kubeconfig_path))) as api:
            await write_secret_keys(api, "experience", "log-probe", {"OPENAI_API_KEY": SecretStr(VALUE)})
            await write_secret_keys(api, "experience", "log-probe", {"OTHER": SecretStr(NEW_VALUE)})
            data = await read_secret(api, "experience", "log-probe")
            gateway = await read_secret(api, "litellm", "litellm-secrets")
    assert data is not None and data["OPENAI_API_KEY"].get_secret_value() == VALUE
    assert gateway is not None and gateway["PROXY_MASTER_KEY"].get_secret_value() == master

    bodies = [r for r in caplog.records if r.name == "kubernetes_asyncio.client.rest"]
    logged = everything_logged(caplog.records)
    # not vacuous: the REST client did log the Secrets' bodies (names and keys), only without their values
    assert any("log-probe" in r.getMessage() and "OPENAI_API_KEY" in r.getMessage() for r in bodies), logged[:2000]
    assert any("litellm-secrets" in r.getMessage() for r in bodies)
    for value in (VALUE, NEW_VALUE, master):
        encoded = base64.b64encode(value.encode()).decode()
        assert value not in logged
        assert encoded not in logged and encoded.rstrip("=") not in logged
