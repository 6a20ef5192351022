"""Spend: what a call costs, the batched write of key spend and spend-log rows (they reach the database
``spend_write_delay_s * time_scale`` seconds late), the budget check on the proxy's in-memory view (which
includes not-yet-written spend), and the spend logs as ``/spend/logs`` and ``/spend/logs/v2`` show them."""

from __future__ import annotations

import copy
import datetime as dt
import time
import uuid
from typing import TYPE_CHECKING, Any

from simstack.standins import litellm_fields as F
from simstack.standins.litellm.errors import ProxyError
from simstack.standins.litellm.keys import token_of
from simstack.standins.litellm.models import Deployment, deployments
from simstack.standins.litellm.shape import iso, jsonb, mold, now, z

if TYPE_CHECKING:
    from collections.abc import Mapping

    from simstack.standins.litellm.auth import Caller
    from simstack.standins.litellm.state import ProxyState


def flush_due(st: ProxyState, everything: bool = False) -> None:
    """The batched write (PROXY_BATCH_WRITE_AT): key spend and spend-log rows reach the database late."""
    t = time.monotonic()
    keep = []
    for item in st.pending:
        due, token, cost, log = item
        if everything or due <= t:
            rec = st.db["keys"].get(token) if token else None
            if rec is not None:
                rec["spend"] = rec.get("spend", 0.0) + cost
                rec["updated_at"] = rec["last_active"] = iso(now())
            if token:
                st.mem_spend[token] = st.mem_spend.get(token, 0.0) - cost
            if log is not None:
                st.db["spend_logs"].append(log)
        else:
            keep.append(item)
    st.pending = keep


def forget(st: ProxyState, tokens: list[str]) -> None:
    """Deleted keys: their spend not yet written is dropped with them."""
    for tok in dict.fromkeys(tokens):
        st.mem_spend.pop(tok, None)
    st.pending = [p for p in st.pending if p[1] not in tokens]


def current_spend(st: ProxyState, token: str) -> float:
    rec = st.db["keys"].get(token) or {}
    return float(rec.get("spend", 0.0)) + st.mem_spend.get(token, 0.0)


def cost_of(dep: Deployment, usage: dict[str, Any] | None) -> tuple[float, float]:
    usage = usage or {}
    pt = int(usage.get("prompt_tokens") or 0)
    ct = int(usage.get("completion_tokens") or 0)
    return pt * dep.price("input_cost_per_token"), ct * dep.price("output_cost_per_token")


def record(
    st: ProxyState,
    caller: Caller,
    dep: Deployment | None,
    usage: dict[str, Any] | None,
    route: str,
    *,
    model: str | None = None,
    error: ProxyError | None = None,
    stream: bool = False,
    started: dt.datetime | None = None,
    request_id: str | None = None,
    user_agent: str = "",
) -> float:
    """A call's spend and its spend-log row, queued for the batched write; its cost."""
    usage = usage or {}
    pt = int(usage.get("prompt_tokens") or 0)
    ct = int(usage.get("completion_tokens") or 0)
    cin, cout = cost_of(dep, usage) if dep is not None and error is None else (0.0, 0.0)
    cost = cin + cout
    t = now()
    rec = st.db["keys"].get(caller.token or "") or {}
    call_id = str(uuid.uuid4())
    log = {
        "request_id": request_id or call_id,
        "litellm_call_id": call_id,
        "call_type": {"/chat/completions": "acompletion", "/completions": "atext_completion"}.get(route, "aembedding"),
        "api_key": caller.token or "litellm_proxy_master_key",  # GUESS: what the master key's rows say
        "alias": rec.get("key_alias"),
        "spend": cost,
        "cost_in": cin,
        "cost_out": cout,
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": pt + ct,
        "startTime": iso(started or t),
        "endTime": iso(t),
        "model": str(dep.litellm_params.get("model") or "") if dep else "",
        "model_id": dep.model_id if dep else "",
        "model_group": model or (dep.model_name if dep else ""),
        "provider": dep.provider if dep else "",
        "api_base": str(dep.litellm_params.get("api_base") or "") if dep and error is None else "",
        "status": "failure" if error else "success",
        "error": error,
        "stream": stream,
        "user_agent": user_agent,
    }
    log["error"] = (
        {"code": str(error.status), "message": error.message, "class": type(error).__name__} if error else None
    )
    delay = st.services.spend_write_delay_s * st.services.time_scale
    st.pending.append((time.monotonic() + delay, caller.token, cost, log))
    if caller.token is not None:
        st.mem_spend[caller.token] = st.mem_spend.get(caller.token, 0.0) + cost
    return cost


def check_budget(st: ProxyState, caller: Caller) -> None:
    if caller.token is None:
        return
    rec = st.db["keys"][caller.token]
    max_budget = rec.get("max_budget")
    if max_budget is None:
        return
    written = float(rec.get("spend", 0.0))
    spend = current_spend(st, caller.token)
    if written >= float(max_budget):  # recorded (budget-call-2): after the write, alias and key_name
        who = f"{rec.get('key_alias')} ({rec.get('key_name')})"
    elif spend >= float(max_budget):  # recorded (budget-immediate-call-2): before it, the hash
        who = caller.token
    else:
        return
    raise ProxyError(
        422,
        f"Budget has been exceeded! Key={who} Current cost: {spend if who == caller.token else written}, "
        f"Max budget: {float(max_budget)}",
        "budget_exceeded",
        None,
    )


# ------------------------------------------------------------------ spend logs
def _log_template(e: dict[str, Any]) -> dict[str, Any]:
    if e["status"] == "failure":
        return F.SPEND_FAIL
    return F.SPEND_STREAM if e["stream"] and e["call_type"] == "atext_completion" else F.SPEND_OK


def _model_map(st: ProxyState, e: dict[str, Any]) -> dict[str, Any]:
    # The declared model_map_information per alias (litellm_fields.MODEL_MAP, as spend-logs-poll-04 shows
    # it), with the row's model, deployment id and that deployment's prices. GUESS: other aliases look like
    # coder-chat's; a deployment deleted since shows prices 0.
    mmi = copy.deepcopy(F.MODEL_MAP.get(e["model_group"]) or F.MODEL_MAP["coder-chat"])
    mmi["model_map_key"] = e["model"]
    value = mmi["model_map_value"]
    value["key"] = e["model_id"]
    dep = next((d for d in deployments(st) if d.model_id == e["model_id"]), None)
    for k in ("input_cost_per_token", "output_cost_per_token"):
        if k in value:
            value[k] = dep.price(k) if dep else 0.0
    return mmi


def _log_view(st: ProxyState, e: dict[str, Any]) -> dict[str, Any]:
    """A spend-log row as /spend/logs shows it (recorded: spend-logs-poll-04, spend-fim-stream-logs-poll-03)."""
    tpl = _log_template(e)
    usage = {"total_tokens": e["total_tokens"], "prompt_tokens": e["prompt_tokens"]}
    usage["completion_tokens"] = e["completion_tokens"]
    ok = e["status"] == "success"
    meta = copy.deepcopy(tpl["metadata"]) | {
        "user_agent": e["user_agent"],
        "user_api_key": e["api_key"],
        "user_api_key_alias": e["alias"],
        "litellm_call_id": e["litellm_call_id"],
        "model_map_information": _model_map(st, e),
        "original_model_group": e["model_group"] if ok else None,
        # GUESS: a fixed overhead (the recording has real milliseconds, null for streams and failures)
        "litellm_overhead_time_ms": 1.5
        if ok and not e["stream"] and e["provider"] != "text-completion-openai"
        else None,
    }
    if ok:
        meta["usage_object"] = mold(usage, tpl["metadata"]["usage_object"])
        meta["cost_breakdown"] = tpl["metadata"]["cost_breakdown"] | {
            "input_cost": e["cost_in"],
            "output_cost": e["cost_out"],
            "total_cost": e["spend"],
            "original_cost": e["spend"],
        }
    else:
        err = e["error"] or {}
        meta["error_information"] = tpl["metadata"]["error_information"] | {
            "error_code": err.get("code"),
            "error_message": err.get("message"),
        }
    t0 = dt.datetime.fromisoformat(e["startTime"])
    t1 = dt.datetime.fromisoformat(e["endTime"])
    return {
        "request_id": e["request_id"],
        "call_type": e["call_type"],
        "api_key": e["api_key"],
        "spend": e["spend"],
        "total_tokens": e["total_tokens"],
        "prompt_tokens": e["prompt_tokens"],
        "completion_tokens": e["completion_tokens"],
        "startTime": z(e["startTime"]),
        "endTime": z(e["endTime"]),
        "completionStartTime": z(e["endTime"]),
        "request_duration_ms": int((t1 - t0).total_seconds() * 1000),
        "model": e["model"],
        "model_id": e["model_id"],
        "model_group": e["model_group"],
        "custom_llm_provider": e["provider"],
        "api_base": e["api_base"],
        "status": e["status"],
        "metadata": meta,
        "session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, e["litellm_call_id"])),
        "litellm_call_id": e["litellm_call_id"],
        "created_at": z(e["endTime"]),
        "updated_at": z(e["endTime"]),
        "cache_hit": "None" if ok and not e["stream"] else "False",
        "request_tags": (
            [f"User-Agent: {e['user_agent'].split('/')[0]}", f"User-Agent: {e['user_agent']}"]
            if ok and e["user_agent"]
            else []
        ),
    }


def logs(st: ProxyState, api_key: str | None) -> list[dict[str, Any]]:
    """/spend/logs, of one key when ``api_key``."""
    rows = st.db["spend_logs"]
    if api_key:
        # recorded (spend-logs-by-key-value): the hash or the raw key
        token = token_of(api_key)
        rows = [e for e in rows if e["api_key"] == token]
    # recorded: newest first
    return [mold(_log_view(st, e), _log_template(e)) for e in reversed(rows[-1000:])]


def logs_v2(st: ProxyState, q: Mapping[str, str]) -> dict[str, Any]:
    """/spend/logs/v2: rows between two dates, paged."""
    if not q.get("start_date") or not q.get("end_date"):
        raise ProxyError(400, "Start date and end date are required", "bad_request")
    try:
        start = dt.datetime.fromisoformat(q["start_date"]).replace(tzinfo=dt.UTC)
        end = dt.datetime.fromisoformat(q["end_date"]).replace(tzinfo=dt.UTC)
        page = max(1, int(q.get("page", "1")))
        size = max(1, min(100, int(q.get("page_size", "50"))))
    except ValueError as exc:
        raise ProxyError(400, f"Invalid query: {exc}", "bad_request") from exc  # GUESS
    rows = [row for row in reversed(st.db["spend_logs"]) if start <= dt.datetime.fromisoformat(row["startTime"]) <= end]
    if q.get("api_key"):
        token = token_of(q["api_key"])
        rows = [row for row in rows if row["api_key"] == token]
    total = len(rows)
    chunk = rows[(page - 1) * size : page * size]
    data = []
    for row in chunk:
        v = _log_view(st, row)
        for f, src in (("startTime", "startTime"), ("endTime", "endTime"), ("completionStartTime", "endTime")):
            d = dt.datetime.fromisoformat(row[src])
            v[f] = d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}+00:00"
        molded = mold(v, F.SPEND_V2_OK if row["status"] == "success" else F.SPEND_V2_FAIL)
        data.append(molded | {"metadata": jsonb(molded["metadata"])})
    return {
        "data": data,
        "total": total,
        "page": page,
        "page_size": size,
        "total_pages": -(-total // size),
        "total_is_capped": False,
    }
