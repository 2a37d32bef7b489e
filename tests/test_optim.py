"""The paper's update rule against numbers worked out by hand, across a learning-rate drop; the schedules."""

import pytest
import torch

from repro.model import AlexNet
from repro.optim import PaperSGD, Schedule, param_groups

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
def test_bias_decay_follows_the_preset(decay_biases):
    model = AlexNet(towers=1)
    groups = param_groups(model, 5e-4, decay_biases)
    by_name = {g["name"]: g for g in groups}
    assert by_name["biases"]["weight_decay"] == (5e-4 if decay_biases else 0.0)
    assert by_name["weights"]["weight_decay"] == 5e-4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {id(p) for p in by_name["conv1"]["params"]} == {id(model.towers[0].conv1.weight),
                                                          id(model.towers[0].conv1.bias)}
    optimizer = PaperSGD(groups, lr=0.1)
    bias = model.fc8.bias
    bias.data.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert bias.data[0].item() == pytest.approx(1.0 - 0.1 * 5e-4 if decay_biases else 1.0)


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
    schedule = Schedule("milestones", lr=0.01, max_epochs=91, milestones=(25, 51, 79), conv1_slow_epoch=67,
                        conv1_freeze_epoch=72)
    assert [schedule.lr(e) for e in (0, 24, 25, 50, 51, 78, 79, 90)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5, 1e-5])
    assert [schedule.conv1_lr(e) for e in (66, 67, 71, 72)] == pytest.approx([1e-4, 1e-5, 1e-5, 0.0])
    assert schedule.colour_noise(66) and not schedule.colour_noise(67)
    for epoch in range(91):
        assert not schedule.finished
        schedule.end_of_epoch(epoch, 50.0)
    assert schedule.finished
    model = AlexNet(towers=1)
    optimizer = PaperSGD(param_groups(model, 5e-4, False), lr=0.01)
    schedule.apply(optimizer, 72)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 1e-4, 1e-4])
