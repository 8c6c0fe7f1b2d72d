"""scripts/make_tiny_hf_checkpoint.py writes a config that describes its weights: MTP in both or in neither."""

import json
import os
import sys

import pytest

from ckpt_convert.cli import main as convert
from ckpt_convert.hf_io import read_all
from tests.ckpt.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.mark.parametrize("mtp", [False, True], ids=["no-mtp", "mtp"])
def test_config_matches_weights_and_conversion(tmp_path, mtp):
    from make_tiny_hf_checkpoint import main

    hf = tmp_path / "hf"
    assert main(["--save-dir", str(hf), *(["--mtp"] if mtp else [])]) == 0
    cfg = json.loads((hf / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    has_mtp_weights = f"model.layers.{n}.eh_proj.weight" in read_all(str(hf))
    assert has_mtp_weights == mtp
    assert cfg["num_nextn_predict_layers"] == (1 if mtp else 0)
    # the tiny layout's flags (layouts/tiny_cpu.sh, no --mtp-num-layers) convert it with the MTP it has
    assert convert(["hf2mcore", "--load-dir", str(hf), "--save-dir", str(tmp_path / "mcore"), "--no-progress",
                    "--num-layers", "4", "--first-k-dense-replace", "1", "--num-experts", "8"]) == 0
    layout = json.loads((tmp_path / "mcore" / "layout.json").read_text())["layout"]
    assert layout["mtp_num_layers"] == (1 if mtp else 0)
