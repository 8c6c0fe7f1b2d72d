"""Extract the schema lines (and the documented constraints we rely on) of the torch_npu operators we call,
from a torch_npu wheel, into tests/ops/torch_npu_schema.txt. The fake torch_npu of the tests is checked against
that file (tests/ops/test_npu_schema.py).

    pip download --no-deps torch-npu==2.13.0 -d /tmp/tnpu      # download only: never pip install it here
    python scripts/extract_torch_npu_schema.py /tmp/tnpu/torch_npu-2.13.0-*.whl

The wheel is read as a zip (it cannot be imported without CANN). Sources inside it:
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml (op schemas) and torch_npu/_op_plugin_docs.py
(the op documentation, constraints). A constraint sentence that is no longer in the docs fails the script, so
a newer wheel that drops a limit we rely on is noticed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import zipfile

# The operators mindspeed_dsv/ops/npu.py calls (schema names in the yaml).
OPS = (
    "npu_fusion_attention",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
    "npu_grouped_matmul",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
)

# (op, sentence fragment of its documentation) for each constraint the fake enforces.
CONSTRAINTS = (
    ("npu_fusion_attention", "支持BSH、SBH、BSND、BNSD、TND(actual_seq_qlen/actual_seq_kvlen需传值)"),
    ("npu_fusion_attention", "输入key和value的shape必须一致"),
    ("npu_fusion_attention", "D: Head Dim必须满足Dq=Dk和Dk≥Dv，取值范围1~768"),
    ("npu_fusion_attention", "数据类型支持float16、bfloat16、float32"),
    ("npu_rms_norm", "输入数据类型仅支持float16、bfloat16和float32"),
    ("npu_rotary_mul", "input: layout支持: BNSD、BSND、SBND; D < 896，且为2的倍数; B, N < 1000"),
    ("npu_rotary_mul", "input为SBND: S11D、SB1D、SBND"),
    ("npu_swiglu", "dtype支持FP32、FP16或BF16类型"),
    ("npu_grouped_matmul", "列表最大长度为128"),
    ("npu_grouped_matmul", "group_list第1维最大支持1024, 即最多支持1024个group"),
    ("npu_grouped_matmul", "支持weight转置. x不支持转置"),
    ("npu_moe_token_permute", "当前版本permuted_tokens仅支持bfloat16"),
    ("npu_moe_token_permute", "数据类型torch.int64，支持非连续Tensor"),
    ("npu_moe_token_permute", "topK小于等于512"),
    ("npu_moe_token_unpermute", "支持的数据类型BFLOAT16"),
)

SCHEMA_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCS = "torch_npu/_op_plugin_docs.py"


def schema_lines(yaml_text: str) -> list[str]:
    """`func: name(...) -> ...` lines of OPS, overloads (name.Overload) excluded, in OPS order."""
    found = {}
    for line in yaml_text.splitlines():
        m = re.match(r"^\s*-?\s*func:\s*((\w+)\(.*)$", line)
        if m and m.group(2) in OPS:
            found.setdefault(m.group(2), m.group(1).strip())
    missing = [op for op in OPS if op not in found]
    if missing:
        raise SystemExit(f"{SCHEMA_YAML}: no schema for {missing}")
    return [found[op] for op in OPS]


def op_doc(docs_text: str, op: str) -> str:
    start = docs_text.find(f'"{op}",')
    if start < 0:
        raise SystemExit(f"{DOCS}: no documentation for {op}")
    end = docs_text.find("_add_torch_npu_docstr", start)
    return docs_text[start:end if end > 0 else len(docs_text)]


def extract(wheel: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        yaml_text = z.read(SCHEMA_YAML).decode("utf-8")
        docs_text = z.read(DOCS).decode("utf-8")
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    out = [
        f"# wheel: {os.path.basename(wheel)}",
        f"# sha256: {digest}",
        f"# regenerate: python scripts/extract_torch_npu_schema.py <wheel>",
        f"# schema: {SCHEMA_YAML}",
    ]
    out += [f"schema {line}" for line in schema_lines(yaml_text)]
    out.append(f"# constraints: sentences of {DOCS}")
    for op, sentence in CONSTRAINTS:
        if sentence not in op_doc(docs_text, op):
            raise SystemExit(f"{DOCS}: the documentation of {op} no longer says {sentence!r}")
        out.append(f"constraint {op}: {sentence}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Extract our torch_npu op schemas and constraints from a torch_npu wheel.")
    p.add_argument("wheel", help="torch_npu wheel file (pip download --no-deps torch-npu==VERSION).")
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "tests", "ops",
                                                    "torch_npu_schema.txt"),
                   help="Where to write the extract. Default tests/ops/torch_npu_schema.txt.")
    args = p.parse_args(argv)
    text = extract(args.wheel)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {os.path.normpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
