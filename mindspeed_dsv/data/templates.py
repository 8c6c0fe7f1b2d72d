"""The DeepSeek-V3/R1 chat format, rendered as text segments that say which parts carry loss.

Messages are OpenAI-style dicts: ``role`` in system/user/assistant/tool, ``content``, and on assistant turns
optionally ``reasoning_content``, ``tool_calls`` and ``loss`` (default True). The layout is exactly the one of
the chat template in ``assets/tiny_deepseek3/tokenizer_config.json`` (tests/data checks token-for-token):

    BOS + system prompts joined by "\\n\\n" [+ "## Tools ..." list]
    "<｜User｜>" + content
    "<｜Assistant｜>" | "<｜tool▁outputs▁end｜>"        (prompt side, no loss)
        ["<think>\\n" + reasoning + "\\n</think>\\n\\n"] + content [+ tool calls] + EOS   (loss if turn.loss)
    "<｜tool▁outputs▁begin｜>" "<｜tool▁output▁begin｜>" + content + "<｜tool▁output▁end｜>"   (no loss)

Every segment boundary sits next to a special token, so tokenizing segment by segment gives the same ids as
tokenizing the whole string (added tokens split the text before BPE runs).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_BEGIN, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

ROLES = ("system", "user", "assistant", "tool")

Segment = Tuple[str, bool]  # (text, carries loss)


class TemplateError(ValueError):
    """A conversation the template cannot render (empty, no assistant turn, bad role...)."""


def _tools_text(tools: Sequence[Dict[str, Any]]) -> str:
    # json.dumps(ensure_ascii=False) is what transformers' `tojson` jinja filter does
    return "## Tools\nYou can call these functions:" + "".join(
        "\n" + json.dumps(t, ensure_ascii=False) for t in tools
    )


def _tool_calls_text(calls: Sequence[Dict[str, Any]]) -> str:
    parts = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        if "name" not in fn:
            raise TemplateError("tool call without function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        sep = "\n" if i else ""
        parts.append(f"{sep}{CALL_BEGIN}{call.get('type', 'function')}{TOOL_SEP}{fn['name']}\n```json\n{args}\n```{CALL_END}")
    return CALLS_BEGIN + "".join(parts) + CALLS_END


class DeepSeek3Template:
    """``--prompt-type deepseek3``: DeepSeek-V3 (and R1, with ``reasoning_content``) chat format."""

    name = "deepseek3"

    def render(self, messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None
               ) -> List[Segment]:
        """Messages -> ``[(text, loss), ...]`` with adjacent segments of equal loss merged."""
        if not messages:
            raise TemplateError("empty conversation")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise TemplateError(f"message {i}: unknown role {m.get('role')!r} (expected one of {ROLES})")
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise TemplateError(f"message {i}: content must be a string, got {type(content).__name__}")
        if not any(m["role"] == "assistant" for m in messages):
            raise TemplateError("no assistant turn in the conversation")

        systems = [m.get("content") or "" for m in messages if m["role"] == "system"]
        system = "\n\n".join(systems)
        if tools:
            system = (system + "\n\n" if system else "") + _tools_text(tools)

        segs: List[Segment] = [(BOS + system, False)]
        in_tool = False
        for m in messages:
            role = m["role"]
            if role == "user":
                in_tool = False
                segs.append((USER + (m.get("content") or ""), False))
            elif role == "assistant":
                segs.append((OUTPUTS_END if in_tool else ASSISTANT, False))
                in_tool = False
                body = ""
                if m.get("reasoning_content"):
                    body += f"{THINK_BEGIN}\n{m['reasoning_content']}\n{THINK_END}\n\n"
                body += m.get("content") or ""
                if m.get("tool_calls"):
                    body += _tool_calls_text(m["tool_calls"])
                segs.append((body + EOS, bool(m.get("loss", True))))
            elif role == "tool":
                prefix = "\n" + OUTPUT_BEGIN if in_tool else OUTPUTS_BEGIN + OUTPUT_BEGIN
                segs.append((prefix + (m.get("content") or "") + OUTPUT_END, False))
                in_tool = True
        if in_tool:
            segs.append((OUTPUTS_END, False))

        merged: List[Segment] = []
        for text, loss in segs:
            if merged and merged[-1][1] == loss:
                merged[-1] = (merged[-1][0] + text, loss)
            elif text:
                merged.append((text, loss))
        return merged


TEMPLATES = {"deepseek3": DeepSeek3Template}


def get_template(name: str) -> DeepSeek3Template:
    if name not in TEMPLATES:
        raise ValueError(f"--prompt-type {name!r} is not supported (choices: {sorted(TEMPLATES)})")
    return TEMPLATES[name]()
