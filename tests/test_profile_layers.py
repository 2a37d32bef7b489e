"""tools/profile_layers.py: its layer sequences compute exactly what the networks compute, and a tiny profile has
every layer with its time and FLOPs, adding up to the whole step's FLOPs."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import profile_layers  # noqa: E402
from repro.measure import CrossDeviceCopies, exchange_rounds  # noqa: E402
from repro.model import AlexNet  # noqa: E402
from test_model import images, sorted_rounds  # noqa: E402

VARIANTS = [("paper", {}), ("cuda_convnet", {}), ("paper", {"lrn": False}), ("paper", {"overlap_pool": False}),
            ("paper", {"conv1_padding": "symmetric2"})]


@pytest.mark.parametrize("preset, overrides", VARIANTS, ids=[f"{p}-{o}" for p, o in VARIANTS])
def test_the_layer_sequence_is_the_two_tower_forward(preset, overrides):
    torch.manual_seed(0)
    model = AlexNet(preset=preset, **overrides)
    x = images(2)
    layers = profile_layers.two_tower_layers(model)
    for mode in ("eval", "train"):  # train: the same seed draws the same dropout masks
        getattr(model, mode)()
        with torch.no_grad():
            torch.manual_seed(1)
            expected = model(x)
            torch.manual_seed(1)
            got = profile_layers.run_layers(layers, [x.to(d) for d in model.devices])
        assert len(got) == 1 and torch.equal(got[0], expected), mode


def test_the_layer_sequence_queues_each_exchange_as_the_model_does():
    # so that on two GPUs the profile times what the model does (repro.model.exchange)
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:0", "cuda:1")).train()
        inputs = [torch.empty(2, 3, 224, 224, device=d) for d in model.devices]
        with CrossDeviceCopies() as recorder:
            profile_layers.run_layers(profile_layers.two_tower_layers(model), inputs)
    assert sorted_rounds(recorder.rounds) == sorted_rounds(exchange_rounds(2, model.devices))


def test_the_layer_sequence_is_torchvisions_forward():
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(profile_layers.run_layers(profile_layers.torchvision_layers(model), [x])[0], model(x))
    names = [name for name, _, _ in profile_layers.torchvision_layers(model)]
    assert names[:3] == ["conv1", "relu1", "pool1"] and names[-3:] == ["fc7", "relu7", "fc8"]
    assert names.index("dropout6") < names.index("fc6") and names.index("dropout7") < names.index("fc7")


def counted_step_flops(model, x, labels) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), labels).backward()
    return counter.get_total_flops()


@pytest.mark.slow  # builds and times both networks: 10-30 s on two cores
def test_a_tiny_profile_has_every_layer_and_adds_up_to_the_steps_flops():
    result = profile_layers.profile(batch=2, repeats=1)
    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 224, 224) * 60, torch.randint(0, 1000, (2,))
    models = {"two-tower (default options)": AlexNet(), "torchvision alexnet": torchvision.models.alexnet()}
    assert set(result["networks"]) == set(models)
    for name, model in models.items():
        network = result["networks"][name]
        rows = network["layers"]
        assert [r["name"] for r in rows[:-1]] == [n for n, _, _ in (
            profile_layers.two_tower_layers(model) if isinstance(model, AlexNet)
            else profile_layers.torchvision_layers(model))]
        assert rows[-1]["kind"] == "loss"
        assert all(r["forward_ms"] > 0 and r["backward_ms"] >= 0 for r in rows)
        assert network["whole_step_ms"] > 0
        assert network["layers_total_ms"] == pytest.approx(sum(r["forward_ms"] + r["backward_ms"] for r in rows))
        layer_flops = sum(r["forward_flops"] + r["backward_flops"] for r in rows)
        assert layer_flops == counted_step_flops(model.train(), x, labels), name
    text = profile_layers.render(result)
    for row in result["networks"]["two-tower (default options)"]["layers"]:
        assert f"| {row['name']} |" in text
    assert "| lrn |" in text and "| conv |" in text
