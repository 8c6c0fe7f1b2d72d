"""The fake torch_npu has the real operators' signatures: each fake op is checked against the schema lines of
torch_npu 2.13.0 extracted from its wheel (tests/ops/torch_npu_schema.txt, scripts/extract_torch_npu_schema.py)."""

import ast
import inspect
import os
import re

import pytest

from mindspeed_dsv.ops import npu as npu_ops

from .fake_torch_npu import make_fake_torch_npu

SCHEMA = os.path.join(os.path.dirname(__file__), "torch_npu_schema.txt")


def _schemas() -> dict:
    out = {}
    with open(SCHEMA, encoding="utf-8") as f:
        for line in f:
            if line.startswith("schema "):
                m = re.match(r"schema (\w+)\((.*)\) -> (.*)$", line.strip())
                out[m.group(1)] = m.group(2)
    return out


def _default(text: str):
    text = {"True": "True", "False": "False", "None": "None"}.get(text, text)
    if re.fullmatch(r"-?\d+\.", text):  # schema floats may end in '.'
        text += "0"
    return ast.literal_eval(text)


def _parse_args(args: str) -> list:
    """[(name, kind, default)] with kind 'positional' or 'keyword' (after '*'); default inspect.Parameter.empty."""
    out, kind = [], "positional"
    for part in (p.strip() for p in args.split(",")):
        if part == "*":
            kind = "keyword"
            continue
        decl, _, default = part.partition("=")
        name = decl.split()[-1]
        out.append((name, kind, _default(default) if default else inspect.Parameter.empty))
    return out


def test_extract_names_the_wheel_and_every_op_we_call():
    with open(SCHEMA, encoding="utf-8") as f:
        head = f.readline()
    assert head.startswith("# wheel: torch_npu-2.13.0-")
    called = set(re.findall(r"\.(npu_\w+)\(", inspect.getsource(npu_ops)))
    assert called and called <= set(_schemas()), called - set(_schemas())


@pytest.mark.parametrize("op", sorted(_schemas()))
def test_fake_op_signature_matches_the_schema(op):
    fake = make_fake_torch_npu()
    expected = _parse_args(_schemas()[op])
    params = list(inspect.signature(getattr(fake, op)).parameters.values())
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.KEYWORD_ONLY: "keyword"}
    got = [(p.name, kinds[p.kind], p.default) for p in params]
    assert got == expected


def test_schema_parser_reads_defaults():
    assert _parse_args("Tensor self, float epsilon=1e-06, *, int? x=None, str m='half', float s=1.") == [
        ("self", "positional", inspect.Parameter.empty), ("epsilon", "positional", 1e-06),
        ("x", "keyword", None), ("m", "keyword", "half"), ("s", "keyword", 1.0)]
