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


def _check_messages(messages: Sequence[Dict[str, Any]]) -> None:
    """What every template asks of a conversation: known roles, string contents, at least one assistant turn."""
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


class DeepSeek3Template:
    """``--prompt-type deepseek3``: DeepSeek-V3 (and R1, with ``reasoning_content``) chat format."""

    name = "deepseek3"

    def render(self, messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None
               ) -> List[Segment]:
        """Messages -> ``[(text, loss), ...]`` with adjacent segments of equal loss merged."""
        _check_messages(messages)

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


# DeepSeek-V4 (the release's encoding/encoding_dsv4.py; no jinja template ships with the tokenizer).
DSML = "｜DSML｜"
TOOL_RESULT = "<tool_result>{}</tool_result>"
V4_TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<{dsml}tool_calls>\" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name=\"$TOOL_NAME\">
<{dsml}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name=\"$TOOL_NAME2\">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.

If thinking_mode is enabled (triggered by {think_begin}), you MUST output your complete reasoning inside {think_begin}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def _v4_tools_text(tools: Sequence[Dict[str, Any]]) -> str:
    fns = [t["function"] if "function" in t else t for t in tools]  # OpenAI format or bare function schemas
    return V4_TOOLS_TEMPLATE.format(dsml=DSML, think_begin=THINK_BEGIN, think_end=THINK_END,
                                    schemas="\n".join(json.dumps(f, ensure_ascii=False) for f in fns))


def _v4_tool_calls_text(calls: Sequence[Dict[str, Any]]) -> str:
    """DSML invoke blocks: one parameter per argument, strings as is, other values as JSON."""
    invokes = []
    for call in calls:
        fn = call.get("function") or {}
        if "name" not in fn:
            raise TemplateError("tool call without function.name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"arguments": args}  # what the release's encoder does with non-JSON arguments
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>'
            for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n{params}\n</{DSML}invoke>')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


class DeepSeek4Template:
    """``--prompt-type deepseek4``: DeepSeek-V4 chat format, as the release's ``encode_messages`` renders it
    (drop_thinking=True, reasoning effort low):

        BOS, then each system message's content where it stands (the tools section after the first one's)
        "<｜User｜>" + content, with tool messages merged into the user turn as "<tool_result>...</tool_result>"
          (parts joined by "\\n\\n")
        "<｜Assistant｜>" + "</think>" (chat) | "<think>" (thinking mode, turns after the last user turn)   (no loss)
        [reasoning + "</think>"] + content [+ DSML tool calls] + EOS                                      (loss)

    Thinking mode is on when an assistant turn has ``reasoning_content``; as in the release, reasoning of turns
    before the last user turn is dropped unless tools are given. Roles: system, user, assistant, tool.
    """

    name = "deepseek4"

    def render(self, messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None
               ) -> List[Segment]:
        _check_messages(messages)
        thinking = any(m["role"] == "assistant" and m.get("reasoning_content") for m in messages)
        drop_thinking = not tools

        # Tools belong to the first system message (an empty one is put first when there is none), rendered
        # after its content as the release does; system messages stay where they are, without separator.
        messages = [dict(m) for m in messages]
        if tools:
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": ""})
            messages[0]["content"] = (messages[0].get("content") or "") + "\n\n" + _v4_tools_text(tools)
        # The release has no tool role: tool results join the user turn before them (or start one).
        turns: List[Dict[str, Any]] = []
        for m in messages:
            part = TOOL_RESULT.format(m.get("content") or "") if m["role"] == "tool" else (m.get("content") or "")
            if m["role"] in ("system", "assistant"):
                turns.append(m)
            elif turns and turns[-1]["role"] == "user":  # the release merges consecutive user/tool messages
                turns[-1]["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part]})
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)

        segs: List[Segment] = [(BOS, False)]
        for i, t in enumerate(turns):
            if t["role"] == "system":
                segs.append((t.get("content") or "", False))
                continue
            if t["role"] == "user":
                text = USER + "\n\n".join(t["parts"])
                if i + 1 < len(turns) and turns[i + 1]["role"] == "assistant":
                    open_think = thinking and (not drop_thinking or i >= last_user)
                    text += ASSISTANT + (THINK_BEGIN if open_think else THINK_END)
                segs.append((text, False))
                continue
            if i == 0 or turns[i - 1]["role"] != "user":
                raise TemplateError(f"assistant turn {i} does not follow a user turn")
            body = ""
            if thinking and (not drop_thinking or i > last_user):
                body += (t.get("reasoning_content") or "") + THINK_END
            body += t.get("content") or ""
            if t.get("tool_calls"):
                body += _v4_tool_calls_text(t["tool_calls"])
            segs.append((body + EOS, bool(t.get("loss", True))))

        merged: List[Segment] = []
        for text, loss in segs:
            if merged and merged[-1][1] == loss:
                merged[-1] = (merged[-1][0] + text, loss)
            elif text:
                merged.append((text, loss))
        return merged


TEMPLATES = {"deepseek3": DeepSeek3Template, "deepseek4": DeepSeek4Template}


def get_template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"--prompt-type {name!r} is not supported (choices: {sorted(TEMPLATES)})")
    return TEMPLATES[name]()
