"""The rooms of ARCHITECTURE.md, checked on the source: the training package and the rest of mindspeed_dsv never
import the converter, and the converter never imports training (both share mindspeed_dsv.rankfiles)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def imports(package):
    """(file, imported module) for every import statement under `package`, lazy ones included."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    out += [(os.path.relpath(path, ROOT), a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    out.append((os.path.relpath(path, ROOT), node.module))
                    out += [(os.path.relpath(path, ROOT), f"{node.module}.{a.name}") for a in node.names]
    return out


def test_mindspeed_dsv_never_imports_the_converter():
    bad = [(f, m) for f, m in imports("mindspeed_dsv") if m == "ckpt_convert" or m.startswith("ckpt_convert.")]
    assert not bad, bad


def test_converter_never_imports_training():
    bad = [(f, m) for f, m in imports("ckpt_convert")
           if m.startswith("mindspeed_dsv.training") or m in ("mindspeed_dsv.train", "mindspeed_dsv.training")]
    assert not bad, bad


def test_scan_sees_lazy_imports():
    # the converter's lazy import of the NF4 quantizer inside a function is found (the scan is not top-level only)
    assert ("ckpt_convert/hf2mcore.py", "mindspeed_dsv.peft.nf4") in imports("ckpt_convert")

