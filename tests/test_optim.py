"""The paper's update rule against numbers worked out by hand, across a learning-rate drop; the parameter groups
(bias decay, bias rate), the schedules, and loading an optimizer state from a checkpoint."""

import pytest
import torch

from helpers import train_config
from repro.config import validate
from repro.model import AlexNet
from repro.optim import GROUPS, PaperSGD, Schedule, load_state, param_groups
from repro.errors import RunError

GRADS = [0.5, -0.2, 0.3]
RATES = [0.1, 0.1, 0.01]  # the rate drops tenfold before the third step
# By hand: v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v, from w = 1, v = 0.
#   v1 = -0.0005*0.1*1 - 0.1*0.5                                   = -0.05005          w1 = 0.94995
#   v2 = 0.9*v1 - 0.0005*0.1*0.94995 + 0.1*0.2                     = -0.0250924975     w2 = 0.9248575025
#   v3 = 0.9*v2 - 0.0005*0.01*0.9248575025 - 0.01*0.3              = -0.0255878720375125
#   w3 = 0.8992696304624875
BY_HAND = [0.94995, 0.9248575025, 0.8992696304624875]


def run(optimizer_class, **kwargs):
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = optimizer_class([w], lr=RATES[0], momentum=0.9, weight_decay=5e-4, **kwargs)
    seen = []
    for g, lr in zip(GRADS, RATES):
        for group in optimizer.param_groups:
            group["lr"] = lr
        w.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        seen.append(w.item())
    return seen


def test_paper_rule_matches_the_hand_computed_sequence():
    assert run(PaperSGD) == pytest.approx(BY_HAND, rel=1e-14, abs=0)


def test_torch_sgd_agrees_until_the_rate_drops_then_differs():
    torch_sgd = run(torch.optim.SGD)
    assert torch_sgd[:2] == pytest.approx(BY_HAND[:2], rel=1e-14)
    # torch rescales the whole momentum history by the new rate: w3 = w2 - 0.01 * (0.9 b2 + g3 + wd w2)
    assert abs(torch_sgd[2] - BY_HAND[2]) > 0.02


@pytest.mark.parametrize("decay_biases", [True, False])
def test_bias_decay_follows_the_setting_for_every_bias(decay_biases):
    model = AlexNet(num_classes=10)  # both towers
    groups = param_groups(model, 5e-4, decay_biases)
    assert [g["name"] for g in groups] == list(GROUPS)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    conv1 = [t.conv1 for t in model.towers]
    assert {id(p) for p in groups[0]["params"]} == {id(c.weight) for c in conv1}
    assert {id(p) for p in groups[1]["params"]} == {id(c.bias) for c in conv1}
    optimizer = PaperSGD(groups, lr=0.1)
    for p in model.parameters():
        p.data.fill_(1.0)
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: each parameter moves by its weight decay alone
    biases = [(name, p) for name, p in model.named_parameters() if name.endswith("bias")]
    weights = [(name, p) for name, p in model.named_parameters() if name.endswith("weight")]
    assert len(biases) == len(weights) == 15  # 7 layers in each tower, and fc8
    for name, p in biases:
        assert torch.all(p == (1.0 - 0.1 * 5e-4 if decay_biases else 1.0)), name
    for name, p in weights:
        assert torch.all(p == 1.0 - 0.1 * 5e-4), name


def test_paper_settings_update_every_parameter_as_one_group_would():
    """The paper's biases follow the text (the weights' rate, decayed): four groups, the same numbers as one."""
    torch.manual_seed(0)
    grouped, single = AlexNet(num_classes=10, towers=1), AlexNet(num_classes=10, towers=1)
    single.load_state_dict(grouped.state_dict())
    schedule = Schedule("plateau", lr=0.01)
    optimizer = PaperSGD(param_groups(grouped, 5e-4, True), lr=0.01)
    reference = PaperSGD(single.parameters(), lr=0.01)
    for step in range(3):
        if step == 2:
            schedule.drops = 1  # a plateau drop before the third step
        schedule.apply(optimizer, step)
        reference.param_groups[0]["lr"] = schedule.lr(step)
        for a, b in zip(grouped.parameters(), single.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for (name, a), b in zip(grouped.named_parameters(), single.parameters()):
        assert torch.equal(a, b), name


def test_plateau_schedule_divides_by_ten_three_times_then_ends():
    schedule = Schedule("plateau", lr=0.01, patience=2, max_drops=3, max_epochs=100)
    errors = [50, 40, 41, 42, 39, 39, 39, 38, 38, 38, 38, 38]
    rates = []
    for epoch, error in enumerate(errors):
        rates.append(schedule.lr(epoch))
        schedule.end_of_epoch(epoch, error)
        if schedule.finished:
            break
    # no improvement at epochs 2, 3 -> drop; 5, 6 -> drop; 8, 9 -> drop; 10, 11 -> end
    assert rates == pytest.approx([0.01] * 4 + [0.001] * 3 + [1e-4] * 3 + [1e-5] * 2)
    assert schedule.finished and epoch == 11
    restored = Schedule("plateau", lr=0.01)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()


def test_milestone_schedule_is_the_2012_run():
    # the notes' 1-based epochs 25/51/79, 67, 72 and "91: killed" are epochs 24/50/78, 66, 71 and 90 epochs here
    schedule = Schedule("milestones", lr=0.01, max_epochs=90, milestones=(24, 50, 78), conv1_slow_epoch=66,
                        conv1_freeze_epoch=71)
    assert [schedule.lr(e) for e in (0, 23, 24, 49, 50, 77, 78, 89)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5, 1e-5])
    assert [schedule.group_lr("conv1_weights", e) for e in (65, 66, 70, 71)] == pytest.approx([1e-4, 1e-5, 1e-5, 0.0])
    assert schedule.colour_noise(65) and not schedule.colour_noise(66)
    for epoch in range(90):
        assert not schedule.finished
        schedule.end_of_epoch(epoch, 50.0)
    assert schedule.finished
    assert "epoch 24 (counted from 0; the 2012 notes count from 1: their epoch 25)" in schedule.describe(24)


# The rate of each group (conv1's weights, conv1's biases, the other weights, the other biases) in run #145's
# schedule, across the first drop (24), conv1's slow-down (66), conv1's freeze (71) and the last drop (78).
EPOCHS = (0, 23, 24, 50, 65, 66, 70, 71, 78, 89)
BIAS_LR_002 = [(0.01, 0.02, 0.01, 0.02), (0.01, 0.02, 0.01, 0.02), (1e-3, 0.02, 1e-3, 0.02), (1e-4, 0.02, 1e-4, 0.02),
               (1e-4, 0.02, 1e-4, 0.02), (1e-5, 0.02, 1e-4, 0.02), (1e-5, 0.02, 1e-4, 0.02), (0, 0, 1e-4, 0.02),
               (0, 0, 1e-5, 0.02), (0, 0, 1e-5, 0.02)]
BIAS_LR_NONE = [(0.01,) * 4, (0.01,) * 4, (1e-3,) * 4, (1e-4,) * 4, (1e-4,) * 4, (1e-5, 1e-5, 1e-4, 1e-4),
                (1e-5, 1e-5, 1e-4, 1e-4), (0, 0, 1e-4, 1e-4), (0, 0, 1e-5, 1e-5), (0, 0, 1e-5, 1e-5)]


@pytest.mark.parametrize("bias_lr, expected", [(0.02, BIAS_LR_002), (None, BIAS_LR_NONE)])
def test_each_group_rate_across_drops_conv1_slow_down_and_freeze(bias_lr, expected):
    schedule = Schedule("milestones", lr=0.01, max_epochs=90, milestones=(24, 50, 78), conv1_slow_epoch=66,
                        conv1_freeze_epoch=71, bias_lr=bias_lr)
    optimizer = PaperSGD(param_groups(AlexNet(num_classes=10), 5e-4, False), lr=0.01)
    for epoch, rates in zip(EPOCHS, expected):
        schedule.apply(optimizer, epoch)
        assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
            (name, pytest.approx(rate, rel=1e-12)) for name, rate in zip(GROUPS, rates)], epoch
    assert schedule.rates(24) == ({"lr": 1e-3, "bias_lr": 0.02} if bias_lr else {"lr": 1e-3})


def test_negative_bias_rate_is_refused():
    with pytest.raises(RunError, match="optim.bias_lr=-0.1: must be at least 0"):
        validate(train_config("optim.bias_lr=-0.1"))


def three_group_optimizer(model):
    """The layout of checkpoints written before conv1's biases had their own group: conv1, weights, biases."""
    groups = {"conv1": [], "weights": [], "biases": []}
    for name, p in model.named_parameters():
        groups["conv1" if ".conv1." in name else "biases" if name.endswith("bias") else "weights"].append(p)
    return PaperSGD([{"name": name, "params": params} for name, params in groups.items()], lr=0.01)


def take_a_step(model, optimizer):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def test_a_three_group_checkpoint_loads_each_velocity_onto_its_parameter():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10)
    old = three_group_optimizer(model)
    take_a_step(model, old)
    saved = old.state_dict()
    optimizer = PaperSGD(param_groups(model, 5e-4, False), lr=0.01)
    load_state(optimizer, saved, model)
    for name, p in model.named_parameters():
        assert torch.equal(optimizer.state[p]["velocity"], old.state[p]["velocity"]), name
    # the groups keep this run's settings: conv1's biases are no longer decayed
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("conv1_weights", 5e-4), ("conv1_biases", 0.0), ("weights", 5e-4), ("biases", 0.0)]
    take_a_step(model, optimizer)


def test_a_checkpoint_of_this_layout_loads_with_this_runs_settings():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, towers=1)
    before = PaperSGD(param_groups(model, 5e-4, True), lr=0.01)
    take_a_step(model, before)
    optimizer = PaperSGD(param_groups(model, 5e-4, False), lr=0.01, momentum=0.5)
    load_state(optimizer, before.state_dict(), model)
    for name, p in model.named_parameters():
        assert torch.equal(optimizer.state[p]["velocity"], before.state[p]["velocity"]), name
    assert [(g["weight_decay"], g["momentum"]) for g in optimizer.param_groups] == [(5e-4, 0.5), (0.0, 0.5)] * 2


@pytest.mark.parametrize("foreign", ["one group", "three groups of another model"])
def test_an_optimizer_state_of_another_layout_is_refused_in_one_line(foreign):
    model = AlexNet(num_classes=10, towers=1)
    foreign = (PaperSGD(model.parameters(), lr=0.01) if foreign == "one group"
               else three_group_optimizer(AlexNet(num_classes=10)))
    optimizer = PaperSGD(param_groups(model, 5e-4, False), lr=0.01)
    with pytest.raises(RunError, match=r"optimizer state has the groups .*resume with the settings") as error:
        load_state(optimizer, foreign.state_dict(), model)
    assert "\n" not in str(error.value)
