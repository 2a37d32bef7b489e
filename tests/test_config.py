"""The model config group: presets compose, typos and wrong types fail at compose time, the builder obeys."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from repro.config import build_model, model_kwargs
from repro.model import PRESETS

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_composes_and_builds(preset):
    cfg = compose_train(f"model={preset}")
    model = build_model(cfg.model)
    assert model.preset == preset and model.options == PRESETS[preset]


def test_overrides_reach_the_model():
    cfg = compose_train("model=cuda_convnet", "model.lrn=false", "model.towers=1", "model.dropout_style=inverted",
                        "model.init_bias=0.1")
    assert model_kwargs(cfg.model) == {"preset": "cuda_convnet", "lrn": False, "towers": 1,
                                       "dropout_style": "inverted", "init_bias": 0.1}
    model = build_model(cfg.model)
    assert model.options == dict(PRESETS["cuda_convnet"], lrn=False, towers=1, dropout_style="inverted",
                                 init_bias=0.1)
    assert len(model.towers) == 1


@pytest.mark.parametrize("override, message", [
    ("model.lrn=maybe", "model.lrn"),
    ("model.lrn_postion=before_relu", "lrn_postion"),
    ("model.preset=caffe", "caffe"),
    ("model.conv1_padding=pad227", "pad227"),
])
def test_bad_values_fail_when_composed(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(override)
    assert message in str(err.value) + str(err.value.__cause__)
