import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cfg671():
    return json.loads((REPO / "assets/deepseek3_671b/config.json").read_text())


@pytest.fixture(scope="session")
def tiny_cfg():
    return json.loads((REPO / "assets/tiny_deepseek3/config.json").read_text())
