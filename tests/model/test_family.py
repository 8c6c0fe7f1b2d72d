import pytest

from mindspeed_dsv.models.config import DeepSeekConfig
from mindspeed_dsv.models.deepseek4.config import DeepSeekV4Config
from mindspeed_dsv.models.family import DEEPSEEK3, DEEPSEEK4, family_of, model_config
from tests.model.hf_reference import ROOT


def test_family_of_the_shipped_configs():
    assert isinstance(model_config(f"{ROOT}/assets/tiny_deepseek3"), DeepSeekConfig)
    assert isinstance(model_config(f"{ROOT}/assets/tiny_deepseek4"), DeepSeekV4Config)
    assert family_of({"model_type": "kimi_k2"}) == DEEPSEEK3
    assert family_of({"compress_ratios": [0, 4, 128]}) == DEEPSEEK4  # the official release's spelling


def test_unknown_model_type_is_named():
    with pytest.raises(ValueError, match="model_type='llama'"):
        family_of({"model_type": "llama"})
