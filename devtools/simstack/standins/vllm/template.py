"""The chat prompt as Qwen2.5's chat template writes it (``chat_prompt_text``), tools in the hermes format: what
a chat request's prompt tokens are counted of."""

from __future__ import annotations

import json
from typing import Any

from simstack.standins.vllm.text import _text_of

# Qwen2.5's chat template (what the prompt token count is taken of). GUESS: counted with the stand-in's
# tokenizer, so prompt_tokens are near, not equal to, the recorded ones (chat-hi: 30).
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_HERMES_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def chat_prompt_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    system = QWEN_SYSTEM
    rest = messages
    if messages and messages[0].get("role") == "system":
        system, rest = _text_of(messages[0].get("content")), messages[1:]
    if tools:
        system += _HERMES_TOOLS.format(tools="\n".join(json.dumps(t) for t in tools))
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for m in rest:
        role = m.get("role")
        content = _text_of(m.get("content"))
        if role == "tool":
            parts.append(f"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n")
            continue
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {} if isinstance(c, dict) else {}
            content += (
                f'\n<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {fn.get("arguments")}}}\n</tool_call>'
            )
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)
