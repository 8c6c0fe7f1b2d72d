"""mindspeed2mcore and mindspeed2hf: wall time and bytes written, on the MindSpeed-LLM test fixture (tests/ckpt/mindspeed_writer.py
over a tiny HF model scaled up with --hidden / --experts). Bytes written are the process's write() bytes
(/proc/self/io wchar) during the conversion, so a staging copy counts; the output's own size is printed beside.

    PYTHONPATH=. python benchmarks/bench_mindspeed_convert.py --work /tmp/bench_ms
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/bench_mindspeed_convert")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)

    from ckpt_convert.cli import main as convert
    from ckpt_convert.hf_io import read_config
    from tests.ckpt.helpers import make_hf_dir
    from tests.ckpt.mindspeed_writer import write_mindspeed

    shutil.rmtree(a.work, ignore_errors=True)
    hf = make_hf_dir(os.path.join(a.work, "hf"), mtp=True,
                     config_overrides={"hidden_size": a.hidden, "n_routed_experts": a.experts})
    case = dict(tp=2, ep=2, expert_tp=1, grouped=True, mtp_num_layers=1)
    theirs = os.path.join(a.work, "theirs")
    write_mindspeed(hf, theirs, read_config(hf), **case)
    flags = ["--source-tensor-parallel-size", "2", "--source-expert-parallel-size", "2",
             "--source-expert-tensor-parallel-size", "1", "--moe-grouped-gemm", "--mtp-num-layers", "1"]
    rows = []
    runs = [("mindspeed2mcore", []),
            ("mindspeed2mcore", ["--target-expert-parallel-size", "1", "--target-expert-tensor-parallel-size", "2"]),
            ("mindspeed2hf", [])]
    for command, target in runs:
        times, written = [], []
        for _ in range(a.repeat):
            out = os.path.join(a.work, "out")
            shutil.rmtree(out, ignore_errors=True)
            w0, t0 = _wchar(), time.perf_counter()
            assert convert([command, "--load-dir", theirs, "--model-config", hf, "--save-dir", out,
                            "--no-progress"] + flags + target) == 0
            times.append(time.perf_counter() - t0)
            written.append(_wchar() - w0)
        rows.append({"command": command, "target": " ".join(target) or "same layout",
                     "seconds_min": round(min(times), 3), "bytes_written": min(written), "output_bytes": _size(out),
                     "source_bytes": _size(theirs)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
