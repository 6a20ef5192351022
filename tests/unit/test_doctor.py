"""`coder-stack doctor` against the LiteLLM stand-in (held to the recorded LiteLLM 1.108.7 by
tests/conformance, its held-out part reported there) in front of vLLM stand-ins: that is the test of the
recorded behaviour. The faults the stand-in cannot be made to show (no prices, a foreign api_base, an
update that does nothing, a wrong served name) use a small in-process fake, which proves only how doctor
reports them, not what LiteLLM answers."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from coder_stack.spec import StackSpec, Timeouts
from coder_stack.usecases import doctor
from tests.kits.gateway import gateway_stack

MASTER = "sk-master-doctor-" + "0" * 16
SPEC = StackSpec(timeouts=Timeouts(spend_visible_s=1.0))
ALL_UP = {m.name: 1 for m in SPEC.models}


def _h(v: str) -> str:
    return hashlib.sha256(v.encode()).hexdigest()


class FakeLiteLLM:
    def __init__(self, spec: StackSpec = SPEC, *, priced: bool = True, update_works: bool = True) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        self.update_works = update_works
        price = {"input_cost_per_token": 5e-7, "output_cost_per_token": 1.5e-6} if priced else {}
        self.models: list[dict[str, Any]] = [
            {
                "model_name": m.alias,
                "litellm_params": {
                    "model": f"openai/{m.served_model_name}",
                    "api_base": f"http://{m.name}.serving.svc.cluster.local:8000/v1",
                    **price,
                },
                "model_info": {"id": m.name, **price},
            }
            for m in spec.models
            if not m.register_at_runtime
        ] + [{"model_name": "embeddings", "litellm_params": {"model": "openai/e", **price}, "model_info": price}]

    @staticmethod
    def _err(status: int, etype: str, msg: str) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": msg, "type": etype, "code": str(status)}})

    def _find(self, v: str) -> dict[str, Any] | None:
        return self.keys.get(v) or self.keys.get(_h(v))

    def handler(self, req: httpx.Request) -> httpx.Response:
        path, q = req.url.path, req.url.params
        body = json.loads(req.content) if req.content else {}
        auth = req.headers.get("authorization", "").removeprefix("Bearer ")
        if path == "/health/readiness":
            return httpx.Response(200, json={"status": "healthy", "db": "connected"})
        if path.startswith("/v1/"):
            return self._data_plane(path, body, auth)
        if auth != MASTER:
            return self._err(401, "auth_error", "Authentication Error")
        rec: dict[str, Any] | None
        if path == "/key/generate":
            value = "sk-" + secrets.token_hex(12)
            rec = {"token": _h(value), "key_alias": body["key_alias"], "models": body["models"],
                   "max_budget": body["max_budget"], "spend": 0.0, "status": "active"}  # fmt: skip
            self.keys[rec["token"]] = rec
            return httpx.Response(200, json={**rec, "key": value})
        if path == "/key/info":
            rec = self._find(q["key"])
            if rec is None:
                return self._err(404, "not_found_error", "Key not found in database.")
            return httpx.Response(200, json={"key": q["key"], "info": {k: v for k, v in rec.items() if k != "token"}})
        if path == "/key/list":
            recs = [r for r in self.keys.values() if r["key_alias"] == q["key_alias"] and r["status"] != "deleted"]
            return httpx.Response(200, json={"keys": recs, "total_count": len(recs)})
        if path == "/key/update":
            rec = self._find(body["key"])
            if rec is None:
                return self._err(404, "not_found_error", "Key not found")
            if self.update_works:
                rec.update({k: body[k] for k in ("models", "max_budget") if k in body})
            return httpx.Response(200, json=rec)
        if path == "/key/delete":
            rec = self._find(body["keys"][0])
            if rec is None or rec["status"] == "deleted":
                return self._err(404, "internal_server_error", "{'error': 'No keys found'}")
            rec["status"] = "deleted"
            return httpx.Response(200, json={"deleted_keys": body["keys"]})
        if path == "/model/info":
            return httpx.Response(200, json={"data": self.models})
        if path == "/spend/logs":
            return httpx.Response(200, json=[e for e in self.logs if e["api_key"] == q["api_key"]])
        return self._err(404, "not_found_error", path)

    def _data_plane(self, path: str, body: dict[str, Any], auth: str) -> httpx.Response:
        rec = self.keys.get(_h(auth))
        if rec is None or rec["status"] == "deleted":
            return self._err(401, "token_not_found_in_db", "Authentication Error, Invalid API key passed")
        model = body.get("model")
        if model not in {m["model_name"] for m in self.models}:
            return self._err(400, "invalid_request_error", f"Invalid model name passed in model={model}")
        ident = "cmpl-" + secrets.token_hex(8)
        headers = {"x-litellm-version": "1.108.7"}
        if body.get("stream"):
            zero = {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}
            chunks = [
                {"id": ident, "object": "text_completion", "model": model, "choices": [{"index": 0, "text": "a + b"}],
                 "usage": zero},
                {"id": ident, "object": "text_completion", "model": model,
                 "choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": zero},
            ]  # fmt: skip
            self.logs.insert(0, {"request_id": ident, "api_key": rec["token"], "spend": 0.0, "total_tokens": 0})
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, content=sse.encode(), headers=headers | {"content-type": "text/event-stream"})
        usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
        self.logs.insert(0, {"request_id": ident, "api_key": rec["token"], "spend": 1e-5, "total_tokens": 10})
        msg = {"role": "assistant", "content": "Hi"}
        return httpx.Response(
            200,
            json={"id": ident, "object": "chat.completion", "model": model, "usage": usage,
                  "choices": [{"index": 0, "message": msg, "finish_reason": "length"}]},
            headers=headers,
        )  # fmt: skip


def _client(fake: FakeLiteLLM) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://gw.test", transport=httpx.MockTransport(fake.handler))


async def _run(fake: FakeLiteLLM, spec: StackSpec = SPEC, serving: dict[str, int] | None = None) -> dict[str, Any]:
    async with _client(fake) as gw:
        rows = await doctor.gateway_checks(gw, SecretStr(MASTER), spec, serving=ALL_UP if serving is None else serving)
    return {r.name: r for r in rows}


async def test_everything_passes_against_the_litellm_standin_and_its_keys_are_deleted() -> None:
    async with gateway_stack(SPEC, spend_write_delay_s=0.2) as st, httpx.AsyncClient(base_url=st.url) as gw:
        got = await doctor.gateway_checks(gw, SecretStr(st.master), SPEC, serving=ALL_UP)
        rows = {r.name: r for r in got}
        listed = await gw.get(
            "/key/list", params={"return_full_object": "true"}, headers={"Authorization": f"Bearer {st.master}"}
        )
    assert [(n, r.seen) for n, r in rows.items() if r.status == "fail"] == []
    assert rows["gateway version"].status == "ok" and "1.108.7" in rows["gateway version"].seen
    for step in ("key: mint", "key: /key/info by hash", "key: /key/list full object", "key: call with the key",
                 "key: /key/update by value", "key: /key/delete by hash", "key: /key/info after delete",
                 "key: call with the deleted key"):  # fmt: skip
        assert rows[step].status == "ok", (step, rows[step].seen)
    assert rows["streamed FIM metering"].seen == doctor.NOT_METERED  # as recorded: a streamed FIM costs $0
    # the throwaway keys are gone from the gateway
    keys = listed.json().get("keys") or []
    assert not [k for k in keys if str(k.get("key_alias", "")).startswith(doctor.DOCTOR_ALIAS_PREFIX)], keys
    text = "".join(r.model_dump_json() for r in rows.values())
    assert st.master not in text and "sk-" not in text.replace("sk-***", "")


async def test_everything_passes_against_the_fake_and_keys_are_deleted() -> None:
    fake = FakeLiteLLM()
    rows = await _run(fake)
    assert [n for n, r in rows.items() if r.status == "fail"] == []
    assert rows["gateway version"].status == "ok" and "1.108.7" in rows["gateway version"].seen
    assert rows["aliases in /model/info"].status == "warn"  # coder-agent: registered at run time
    assert "coder-agent" in rows["aliases in /model/info"].seen
    for step in ("key: mint", "key: /key/info by hash", "key: /key/list full object", "key: call with the key",
                 "key: /key/update by value", "key: /key/delete by hash", "key: /key/info after delete",
                 "key: call with the deleted key"):  # fmt: skip
        assert rows[step].status == "ok", (step, rows[step].seen)
    assert rows["streamed FIM metering"].status == "warn"
    assert rows["streamed FIM metering"].seen == doctor.NOT_METERED
    assert fake.keys and all(r["status"] == "deleted" for r in fake.keys.values())
    assert all(r["key_alias"].startswith(doctor.DOCTOR_ALIAS_PREFIX) for r in fake.keys.values())
    text = "".join(r.model_dump_json() for r in rows.values())
    assert MASTER not in text and "sk-" not in text.replace("sk-***", "")


async def test_a_missing_alias_fails_and_is_named() -> None:
    models = [m.model_copy(update={"alias": "ghost-chat"}) if m.role == "chat" else m for m in SPEC.models]
    keys = [k.model_copy(update={"models": ["ghost-chat" if a == "coder-chat" else a for a in k.models]})
            for k in SPEC.virtual_keys]  # fmt: skip
    spec = StackSpec(models=models, virtual_keys=keys)
    rows = await _run(FakeLiteLLM(), spec, serving={})
    row = rows["aliases in /model/info"]
    assert row.status == "fail" and "missing: ghost-chat, coder-agent" in row.seen and "400" in row.seen
    assert doctor.DoctorReport(rows=list(rows.values())).ok is False


async def test_no_prices_and_a_foreign_api_base_are_warnings() -> None:
    fake = FakeLiteLLM(priced=False)
    fake.models[0]["litellm_params"]["api_base"] = "http://10.0.0.7:8000/v1"
    rows = await _run(fake)
    assert rows["prices: coder-chat"].status == "warn" and "no prices configured" in rows["prices: coder-chat"].seen
    up = rows["upstream: coder-chat"]
    assert up.status == "warn" and "10.0.0.7" in up.seen and "coder-chat.serving.svc.cluster.local" in up.seen
    assert rows["upstream: coder-fim"].status == "ok"


async def test_a_failing_step_skips_the_rest_and_the_throwaway_key_is_still_deleted() -> None:
    fake = FakeLiteLLM(update_works=False)
    rows = await _run(fake)
    assert rows["key: /key/update by value"].status == "fail"
    assert rows["key: /key/delete by hash"].status == "skipped"
    assert all(r["status"] == "deleted" for r in fake.keys.values())


async def test_nothing_serving_skips_the_calls_and_says_the_version_is_unknown() -> None:
    fake = FakeLiteLLM()
    rows = await _run(fake, serving={})
    assert rows["key: call with the key"].status == "skipped"
    assert rows["streamed FIM metering"].status == "skipped" and "not serving" in rows["streamed FIM metering"].seen
    assert rows["gateway version"].status == "warn" and "unknown" in rows["gateway version"].seen
    assert rows["key: call with the deleted key"].status == "ok"  # refused before any model is needed


async def test_gateway_down_fails_ready_and_skips_the_rest() -> None:
    def down(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    async with httpx.AsyncClient(base_url="http://gw.test", transport=httpx.MockTransport(down)) as gw:
        rows = await doctor.gateway_checks(gw, SecretStr(MASTER), SPEC)
    assert rows[0].name == "gateway ready" and rows[0].status == "fail"
    assert {r.status for r in rows[1:]} == {"skipped"}


async def test_model_servers_at_zero_are_skipped_and_a_wrong_served_name_fails() -> None:
    vkey = "vllm-key-" + "1" * 16

    def vllm(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/health":
            return httpx.Response(200)
        if req.url.path == "/version":
            return httpx.Response(200, json={"version": "0.32.0"})
        if req.headers.get("authorization") != f"Bearer {vkey}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        return httpx.Response(200, json={"object": "list", "data": [{"id": "qwen2.5-coder-7b-instruct"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(vllm)) as http:
        rows = await doctor.model_server_checks(
            http,
            SPEC,
            SecretStr(vkey),
            {"coder-chat": 1, "coder-fim": 1, "coder-agent": 0},
            {"coder-chat": "http://chat.test", "coder-fim": "http://fim.test"},
        )
        bad_key = await doctor.model_server_checks(
            http, SPEC, SecretStr("wrong-" + "2" * 16), {"coder-chat": 1}, {"coder-chat": "http://chat.test"}
        )
    by = {r.name: r for r in rows}
    assert by["model coder-chat: /health"].status == "ok" and by["model coder-chat: /version"].seen == "vLLM 0.32.0"
    assert by["model coder-chat: served name"].status == "ok"
    assert (
        by["model coder-fim: served name"].status == "fail"
        and "qwen2.5-coder-1.5b" in by["model coder-fim: served name"].seen
    )
    assert by["model coder-agent"].status == "skipped" and by["model coder-agent"].seen == "not serving (replicas 0)"
    [refused] = [r for r in bad_key if r.name == "model coder-chat: served name"]
    assert refused.status == "fail" and "refused the vLLM key" in refused.seen
    assert all(vkey not in r.model_dump_json() for r in rows + bad_key)


@pytest.mark.parametrize("fail", [False, True])
def test_cli_prints_brackets_as_text_and_exits_by_the_result(monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    from coder_stack.app import cli

    rows = [doctor.DoctorRow(name="gateway ready", status="ok", seen="[key] [bold]not markup[/bold]")]
    if fail:
        rows.append(doctor.DoctorRow(name="aliases in /model/info", status="fail", seen="missing: x", todo="add x"))

    async def fake_cluster(target: Any, spec: StackSpec) -> doctor.DoctorReport:
        return doctor.DoctorReport(rows=rows)

    monkeypatch.setattr(doctor, "doctor_cluster", fake_cluster)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["doctor"])
    assert res.exit_code == (1 if fail else 0), res.output
    assert "[key] [bold]not markup[/bold]" in res.output
    assert ("1 fail" in res.output) is fail
    res_json = runner.invoke(cli.app, ["doctor", "--json"])
    data = json.loads(res_json.output)
    assert data["ok"] is (not fail) and data["rows"][0]["seen"] == "[key] [bold]not markup[/bold]"
    assert res_json.exit_code == (1 if fail else 0)


def test_the_doctor_library_imports_no_terminal_library() -> None:
    """Showing a report on a terminal is the app's (app/doctor_view.py): no module of the doctor package
    imports rich, typer or click, also inside a function."""
    import ast
    from pathlib import Path

    package = Path(doctor.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {p.stem for p in modules} >= {"__init__", "rows", "gateway", "servers", "cluster"}, modules
    wrong = []
    for p in modules:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{p.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in {"rich", "typer", "click"}]
    assert wrong == []


def test_the_view_styles_each_status_and_prints_the_summary_after_the_rows() -> None:
    import io

    from rich.console import Console
    from rich.text import Text

    from coder_stack.app.doctor_view import STYLE, render, show

    statuses: list[doctor.Status] = ["ok", "warn", "fail", "skipped"]
    report = doctor.DoctorReport(
        rows=[doctor.DoctorRow(name=f"check {s}", status=s, seen=f"[seen {s}]", todo=f"todo {s}") for s in statuses]
    )
    status_cells = [c for c in render(report).columns[1].cells if isinstance(c, Text)]
    assert [(c.plain, c.style) for c in status_cells] == [(s, STYLE[s]) for s in statuses]

    def shown(rep: doctor.DoctorReport) -> tuple[str, str]:
        con = Console(file=io.StringIO(), record=True, width=160, force_terminal=True, color_system="truecolor")
        show(con, rep)
        return con.export_text(clear=False), con.export_text(styles=True).rstrip("\n").rsplit("\n", 1)[-1]

    def styled(text: str, style: str) -> str:
        con = Console(file=io.StringIO(), record=True, width=160, force_terminal=True, color_system="truecolor")
        con.print(Text(text, style=style))
        return con.export_text(styles=True).rstrip("\n")

    text, summary_line = shown(report)
    at = [text.index(f"check {s}") for s in statuses] + [text.index(report.summary())]
    assert at == sorted(at) and "[seen fail]" in text  # brackets are text, not markup
    assert not report.ok and summary_line == styled(report.summary(), "bold red")
    fine = doctor.DoctorReport(rows=report.rows[:2])
    assert fine.ok and shown(fine)[1] == styled(fine.summary(), "bold")
