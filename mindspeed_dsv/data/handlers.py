"""Handlers turn one input record into token ids (MindSpeed-LLM handler names).

* ``GeneralPretrainHandler``: ``{json_key: text}`` -> ``{json_key: ids}`` (tokenizer BOS, + EOD with --append-eod).
* ``AlpacaStyleInstructionHandler``: instruction / input / output / system / history.
* ``SharegptStyleInstructionHandler``: conversations [{from, value}], system, tools (JSON string or list).
* ``OpenAIStyleInstructionHandler``: messages [{role, content, reasoning_content, tool_calls, loss}], tools.

Instruction handlers produce ``(input_ids, labels)`` with labels = -100 where no loss is taken. They work on a
batch of records so the tokenizer can encode every text of the batch in one call (the Rust batch encoder is
what keeps preprocess close to the raw tokenizer's speed).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindspeed_dsv.data.readers import DataError
from mindspeed_dsv.data.templates import TemplateError, get_template

IGNORE_INDEX = -100


class BaseHandler:
    """``records`` -> per-record result or DataError; subclasses define ``tokenize_batch``."""

    is_instruction = False
    # The standard record fields ``--map-keys`` may rename (empty: the handler takes no --map-keys).
    FIELDS: Tuple[str, ...] = ()

    def __init__(self, tokenizer, json_keys: Sequence[str], append_eod: bool = False,
                 prompt_type: str = "deepseek3", map_keys: Optional[Dict[str, str]] = None,
                 eod_id: Optional[int] = None):
        # ``tokenizer``: a Hugging Face fast tokenizer or its ``tokenizers.Tokenizer`` backend. Workers get the
        # backend only (built from its JSON), which keeps their start-up free of the transformers import.
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.eod = eod_id if eod_id is not None else getattr(tokenizer, "eos_token_id", None)
        if append_eod and self.eod is None:
            raise ValueError("--append-eod needs a tokenizer with an EOS token")
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.template = get_template(prompt_type)
        self.map_keys = dict(map_keys or {})

    def key(self, name: str) -> str:
        return self.map_keys.get(name, name)


class GeneralPretrainHandler(BaseHandler):
    """Plain text documents; one output dataset per ``--json-keys`` entry."""

    def tokenize_batch(self, records: List[Tuple[str, dict]]) -> List[Any]:
        out: List[Any] = [None] * len(records)
        texts, owners = [], []
        for i, (where, row) in enumerate(records):
            try:
                for k in self.json_keys:
                    if k not in row:
                        raise DataError(where, f"missing key {k!r} (--json-keys {' '.join(self.json_keys)}; "
                                               f"record has {sorted(row)})")
                    if not isinstance(row[k], str):
                        raise DataError(where, f"key {k!r} must be a string, got {type(row[k]).__name__}")
                    if not row[k]:
                        raise DataError(where, f"key {k!r} is empty")
            except DataError as e:
                out[i] = e
                continue
            for k in self.json_keys:
                texts.append(row[k])
            owners.append(i)
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=True) if texts else []
        nk = len(self.json_keys)
        for j, i in enumerate(owners):
            docs = {}
            for ki, k in enumerate(self.json_keys):
                ids = encs[j * nk + ki].ids
                if self.append_eod:
                    ids.append(self.eod)
                docs[k] = np.asarray(ids, dtype=np.int32)
            out[i] = docs
        return out


class _InstructionHandler(BaseHandler):
    is_instruction = True

    def to_messages(self, where: str, row: dict) -> Tuple[List[Dict[str, Any]], Optional[List[dict]]]:
        raise NotImplementedError

    def tokenize_batch(self, records: List[Tuple[str, dict]]) -> List[Any]:
        out: List[Any] = [None] * len(records)
        texts: List[str] = []
        plan = []  # (record index, [(loss) per segment], first text index)
        for i, (where, row) in enumerate(records):
            try:
                messages, tools = self.to_messages(where, row)
                segs = self.template.render(messages, tools)
            except TemplateError as e:
                out[i] = DataError(where, str(e))
                continue
            except DataError as e:
                out[i] = e
                continue
            plan.append((i, [loss for _, loss in segs], len(texts)))
            texts.extend(t for t, _ in segs)
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        for i, losses, start in plan:
            ids: List[int] = []
            labels: List[int] = []
            for j, loss in enumerate(losses):
                seg = encs[start + j].ids
                ids.extend(seg)
                labels.extend(seg if loss else [IGNORE_INDEX] * len(seg))
            out[i] = (np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
        return out


def _need(where: str, row: dict, key: str, kind=str):
    if key not in row or row[key] is None:
        raise DataError(where, f"missing key {key!r} (record has {sorted(row)})")
    if not isinstance(row[key], kind):
        raise DataError(where, f"key {key!r} must be {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def _parse_tools(where: str, tools) -> Optional[List[dict]]:
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(where, f"'tools' is not valid JSON ({e.msg})")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise DataError(where, f"'tools' must be a list, got {type(tools).__name__}")
    return tools


class AlpacaStyleInstructionHandler(_InstructionHandler):
    """instruction [+ "\\n" + input] -> output; optional system and history [[q, a], ...]."""

    FIELDS = ("instruction", "input", "output", "system", "history")

    def to_messages(self, where, row):
        instruction = _need(where, row, self.key("instruction"))
        output = _need(where, row, self.key("output"))
        inp = row.get(self.key("input")) or ""
        msgs = []
        system = row.get(self.key("system"))
        if system:
            msgs.append({"role": "system", "content": system})
        for turn in row.get(self.key("history")) or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataError(where, "'history' must be a list of [query, response] pairs")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = instruction + ("\n" + inp if inp else "")
        if not prompt and not output:
            raise DataError(where, "empty conversation (instruction, input and output are all empty)")
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return msgs, None


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "function_call"}


class SharegptStyleInstructionHandler(_InstructionHandler):
    """conversations [{from: human|gpt|system|function_call|observation, value}], system, tools."""

    FIELDS = ("conversations", "system", "tools")

    def to_messages(self, where, row):
        conv = _need(where, row, self.key("conversations"), list)
        if not conv:
            raise DataError(where, "empty conversation")
        msgs = []
        system = row.get(self.key("system"))
        if system:
            msgs.append({"role": "system", "content": system})
        for n, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(where, f"conversations[{n}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise DataError(where, f"conversations[{n}]: unknown 'from' {turn['from']!r}")
            if role == "function_call":
                try:
                    call = json.loads(turn["value"]) if isinstance(turn["value"], str) else turn["value"]
                    calls = call if isinstance(call, list) else [call]
                    tool_calls = [{"type": "function", "function": {"name": c["name"],
                                                                    "arguments": c.get("arguments", {})}}
                                  for c in calls]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(where, f"conversations[{n}]: function_call value must be JSON with 'name'")
                msgs.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
            else:
                msgs.append({"role": role, "content": turn["value"]})
        return msgs, _parse_tools(where, row.get(self.key("tools")))


class OpenAIStyleInstructionHandler(_InstructionHandler):
    """messages [{role, content, reasoning_content?, tool_calls?, loss?}], tools."""

    FIELDS = ("messages", "tools")

    def to_messages(self, where, row):
        msgs = _need(where, row, self.key("messages"), list)
        if not msgs:
            raise DataError(where, "empty conversation")
        for n, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise DataError(where, f"messages[{n}] needs a 'role'")
        return msgs, _parse_tools(where, row.get(self.key("tools")))


HANDLERS = {
    "GeneralPretrainHandler": GeneralPretrainHandler,
    "AlpacaStyleInstructionHandler": AlpacaStyleInstructionHandler,
    "SharegptStyleInstructionHandler": SharegptStyleInstructionHandler,
    "OpenAIStyleInstructionHandler": OpenAIStyleInstructionHandler,
}


def check_map_keys(handler_name: str, map_keys: Optional[Dict[str, str]]) -> None:
    """Refuse a ``--map-keys`` whose target fields the handler does not read: a typo would otherwise be ignored
    and the error would blame the data ("missing key ...") instead of the flag."""
    if not map_keys:
        return
    fields = HANDLERS[handler_name].FIELDS
    if not isinstance(map_keys, dict):
        raise ValueError(f"--map-keys must be a JSON object of field -> column, got {map_keys!r}")
    if not fields:
        raise ValueError(f"--map-keys does not apply to --handler-name {handler_name} (use --json-keys)")
    unknown = sorted(k for k in map_keys if k not in fields)
    if unknown:
        raise ValueError(f"--map-keys: unknown field(s) {', '.join(map(repr, unknown))} for --handler-name "
                         f"{handler_name}; valid fields: {', '.join(fields)}")
    bad = sorted(k for k, v in map_keys.items() if not isinstance(v, str))
    if bad:
        raise ValueError(f"--map-keys: the column for {', '.join(map(repr, bad))} must be a string")


def get_handler(name: str, tokenizer, json_keys=("text",), append_eod=False, prompt_type="deepseek3",
                map_keys=None, eod_id=None) -> BaseHandler:
    """Build the handler ``name`` (one of HANDLERS) around a HF fast tokenizer or a ``tokenizers.Tokenizer``."""
    if name not in HANDLERS:
        raise ValueError(f"--handler-name {name!r} is not known (choices: {', '.join(HANDLERS)})")
    return HANDLERS[name](tokenizer, json_keys, append_eod, prompt_type, map_keys, eod_id)
