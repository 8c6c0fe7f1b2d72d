"""preprocess_data.py never replaces an existing dataset silently (issue 18.4)."""

import os

from tests.data.conftest import DATA, run_preprocess


def test_existing_output_prefix_refused_unless_overwrite(tmp_path, capsys):
    src = os.path.join(DATA, "pretrain_pydoc.jsonl")
    rc, prefix = run_preprocess(tmp_path, "pt", src, "GeneralPretrainHandler", "--append-eod")
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    capsys.readouterr()
    rc, _ = run_preprocess(tmp_path, "pt", src, "GeneralPretrainHandler")
    err = capsys.readouterr().err
    assert rc == 1 and f"--output-prefix {prefix}" in err and "--overwrite" in err and "pt_text_document.bin" in err, err
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in sorted(os.listdir(tmp_path))} == stamps
    sizes = os.path.getsize(prefix + "_text_document.bin")
    rc, _ = run_preprocess(tmp_path, "pt", src, "GeneralPretrainHandler", "--overwrite")
    assert rc == 0
    assert os.path.getsize(prefix + "_text_document.bin") < sizes  # replaced: no eod tokens this time
