"""The device layer on npu, with torch_npu / torch.npu faked at their documented entry points (import torch_npu
registers torch.npu; torch_npu.contrib.transfer_to_npu patches on import), and on cpu for real."""

import functools
import multiprocessing
import sys
import traceback
import types

import pytest
import torch

from mindspeed_dsv.platform import device as device_mod
from mindspeed_dsv.platform import megatron_compat


class _FakeNpuModule(types.SimpleNamespace):
    """What the device layer calls on torch.npu."""

    def __init__(self):
        super().__init__(calls=[])

    def is_available(self):
        return True

    def current_device(self):
        return 3

    def set_device(self, i):
        self.calls.append(("set_device", i))

    def device_count(self):
        return 8

    def synchronize(self):
        self.calls.append(("synchronize",))

    def manual_seed_all(self, s):
        self.calls.append(("manual_seed_all", s))

    def max_memory_allocated(self):
        return 123

    def get_device_name(self):
        return "Ascend910B3"


@pytest.fixture
def fake_npu(monkeypatch):
    imported = []
    npu = _FakeNpuModule()
    for name in ("torch_npu", "torch_npu.contrib", "torch_npu.contrib.transfer_to_npu"):
        mod = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mod)
    real_import = megatron_compat.importlib.import_module

    def tracking_import(name, *a, **k):
        imported.append(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(megatron_compat.importlib, "import_module", tracking_import)
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "npu")
    device_mod.current_platform.cache_clear()
    yield npu, imported
    device_mod.current_platform.cache_clear()


def _registers_npu(test):
    """Run the test in a forked child that first registers the "npu" device type, as importing torch_npu does
    (torch's privateuse1 backend renamed). The renaming cannot be undone and leaves torch.distributed.barrier
    asking for npu hooks, so it stays out of the test process (tests after it, under pytest-xdist in any order,
    barrier in-process on gloo). The child reports a failure as its traceback."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)

        def child():
            try:
                if torch._C._get_privateuse1_backend_name() != "npu":
                    torch.utils.rename_privateuse1_backend("npu")
                test(*args, **kwargs)
                send.send(None)
            except BaseException:  # noqa: BLE001 - reported to the parent
                send.send(traceback.format_exc())

        proc = ctx.Process(target=child)
        proc.start()
        proc.join(timeout=120)
        assert proc.exitcode == 0 and recv.poll(), f"forked test ended with exit code {proc.exitcode}"
        error = recv.recv()
        if error:
            pytest.fail(error, pytrace=False)

    return run


@_registers_npu
def test_npu_platform_routes_to_torch_npu(fake_npu):
    npu, _ = fake_npu
    p = device_mod.current_platform()
    assert (p.device_type, p.backend, p.is_accelerator) == ("npu", "hccl", True)
    assert p.device() == torch.device("npu", 3)
    p.set_device(5)
    p.manual_seed(7)
    assert ("set_device", 5) in npu.calls and ("manual_seed_all", 7) in npu.calls
    assert p.max_memory_allocated() == 123 and p.device_name() == "Ascend910B3"


@_registers_npu
def test_npu_compat_stands_on_torch_npu_alone(fake_npu, monkeypatch):
    _, imported = fake_npu
    monkeypatch.setattr(megatron_compat, "_applied", {})
    try:
        applied = megatron_compat.apply_megatron_compat(device_mod.current_platform())
        assert {"torch_npu", "torch_npu.contrib.transfer_to_npu"} <= set(imported)
        assert not [m for m in imported if m.startswith("mindspeed")]  # MindSpeed is never imported
        host_only = {s.target for s in megatron_compat.SHIMS if s.devices == ("host",)}
        assert applied and not (set(applied) & host_only)  # torch.cuda is torch_npu's business on npu
        for target in ("megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
                       "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
                       "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__"):
            assert target in applied
    finally:
        megatron_compat.undo_megatron_compat()


@_registers_npu
def test_npu_refuses_an_imported_mindspeed_adaptor(fake_npu, monkeypatch):
    monkeypatch.setattr(megatron_compat, "_applied", {})
    monkeypatch.setitem(sys.modules, "mindspeed.megatron_adaptor", types.ModuleType("mindspeed.megatron_adaptor"))
    with pytest.raises(megatron_compat.IncompatibleAdaptorError, match="megatron-core 0.12.x.*remove the import"):
        megatron_compat.apply_megatron_compat(device_mod.current_platform())


def test_emulated_npu_platform(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "npu-emulated")
    device_mod.current_platform.cache_clear()
    try:
        p = device_mod.current_platform()
        assert (p.device_type, p.emulated, p.backend, p.device(), p.stream()) == ("npu", True, "gloo",
                                                                                   torch.device("cpu"), None)
        assert megatron_compat.shim_keys(p) == ("npu", "host")
        assert megatron_compat.shim_keys(device_mod.Platform("npu")) == ("npu",)
        with pytest.raises(ValueError, match="only the npu"):
            device_mod.Platform("cuda", emulated=True)
    finally:
        device_mod.current_platform.cache_clear()


def test_forcing_npu_without_torch_npu_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ImportError
    monkeypatch.setenv("MINDSPEED_DSV_DEVICE", "npu")
    device_mod.current_platform.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="torch_npu is not installed"):
            device_mod.current_platform()
    finally:
        device_mod.current_platform.cache_clear()


def test_cpu_platform():
    p = device_mod.Platform("cpu")
    assert (p.backend, p.device(), p.stream(), p.device_name()) == ("gloo", torch.device("cpu"), None, "cpu")
    assert p.max_memory_allocated() > 0  # process peak RSS
