"""`pip install .` declares what the package needs: the tested pins of the requirements files (one place for
them), extras `test` and `npu`, and every third-party module the package imports."""

import ast
import importlib.metadata as md
import os
import re
import sys
import tomllib

from setuptools.config.pyprojecttoml import read_configuration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("mindspeed_dsv", "ckpt_convert")
# Imported only on the path that needs them; each lives in an extra.
OPTIONAL = {"torch_npu": "npu", "bitsandbytes": "test"}
# Imported only on CUDA, where torch's CUDA build has installed it (each CUDA wheel of torch requires its matching
# triton): ops/triton_wgrad.py, chosen only for CUDA tensors with triton importable (ops.moe.grouped_wgrad_kernel).
WITH_TORCH_CUDA = {"triton"}


def pins(path):
    out = {}
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", line).groups()
            out[canon(name)] = version
    return out


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def declared():
    project = read_configuration(os.path.join(ROOT, "pyproject.toml"), expand=True)["project"]
    split = lambda reqs: dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", r).groups() for r in reqs)  # noqa: E731
    base = {canon(k): v for k, v in split(project["dependencies"]).items()}
    # setuptools spells the expanded key with an underscore
    extras = {e: {canon(k): v for k, v in split(r).items()} for e, r in project["optional_dependencies"].items()}
    return base, extras


def test_declared_dependencies_are_the_tested_pins():
    base, extras = declared()
    assert base == pins("requirements.txt")
    assert extras["test"] == pins("requirements-test.txt")
    assert extras["npu"] == pins("requirements-npu.txt")
    assert extras["npu"]["torch-npu"] == pins("requirements.txt")["torch"]  # torch_npu is built per torch release
    assert base["megatron-core"] == "0.16.1" and base["torch"] == "2.13.0"


def test_setup_py_is_a_thin_entry():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [c.func.id for c in calls] == ["setup"] and not calls[0].args and not calls[0].keywords
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml", ), "rb"))
    assert cfg["project"]["name"] == "mindspeed_dsv"


def imported_modules():
    """Top-level names of every module imported anywhere in the package (lazy imports included)."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names = [node.module]
                    else:
                        continue
                    for n in names:
                        out.setdefault(n.split(".")[0], os.path.relpath(path, ROOT))
    return out


def test_every_imported_module_is_declared():
    base, extras = declared()
    dists = md.packages_distributions()  # import name -> distributions providing it (installed ones)
    undeclared = []
    for mod, where in sorted(imported_modules().items()):
        if mod in sys.stdlib_module_names or mod in PACKAGES or mod == "__future__" or mod in WITH_TORCH_CUDA:
            continue
        if mod in OPTIONAL:
            assert canon(mod) in extras[OPTIONAL[mod]] or any(
                canon(d) in extras[OPTIONAL[mod]] for d in dists.get(mod, [])), (mod, where)
            continue
        providers = {canon(d) for d in dists.get(mod, [])}
        if not providers & set(base):
            undeclared.append(f"{mod} ({where}; provided by {sorted(providers) or 'nothing installed'})")
    assert not undeclared, undeclared
