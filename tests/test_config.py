"""The model config group: presets compose, typos and wrong types fail at compose time, the builder obeys."""

import pytest

from helpers import train_config as compose_train
from repro.config import build_model, model_kwargs
from repro.errors import RunError
from repro.model import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_composes_and_builds(preset):
    cfg = compose_train(f"model={preset}")
    model = build_model(cfg.model)
    assert model.preset == preset and model.options == PRESETS[preset]


def test_overrides_reach_the_model():
    cfg = compose_train("model=cuda_convnet", "model.lrn=false", "model.towers=1", "model.dropout_style=inverted",
                        "model.init_bias=0.1")
    assert model_kwargs(cfg.model) == {"preset": "cuda_convnet", "width": 1.0, "lrn": False, "towers": 1,
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
    with pytest.raises(RunError) as err:
        compose_train(override)
    assert message in str(err.value) + str(err.value.__cause__)


def test_cuda_convnet_experiment_replays_run_145s_optimisation():
    """Run #145's notes count epochs from 1; here they count from 0, so every notes epoch N is N-1."""
    cfg = compose_train("experiment=cuda_convnet")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 5e-4)
    assert cfg.optim.decay_biases is False and cfg.optim.bias_lr == 0.02
    assert cfg.schedule.kind.name == "milestones" and list(cfg.schedule.milestones) == [24, 50, 78]
    assert (cfg.schedule.conv1_slow_epoch, cfg.schedule.conv1_slow_lr, cfg.schedule.conv1_freeze_epoch,
            cfg.schedule.max_epochs) == (66, 1e-5, 71, 90)


def test_paper_experiment_biases_follow_the_text():
    cfg = compose_train("experiment=paper")
    assert cfg.optim.decay_biases is True and cfg.optim.bias_lr is None and cfg.schedule.kind.name == "plateau"


@pytest.mark.parametrize("experiment, milestones, max_epochs", [("demo", [2], 3), ("tiny", [1], 2)])
def test_small_experiments_keep_their_own_schedule(experiment, milestones, max_epochs):
    cfg = compose_train(f"experiment={experiment}")
    assert list(cfg.schedule.milestones) == milestones and cfg.schedule.max_epochs == max_epochs
    assert cfg.schedule.conv1_slow_epoch is None and cfg.schedule.conv1_freeze_epoch is None
    assert cfg.optim.bias_lr is None and cfg.optim.decay_biases is True
