"""The two-tower network: sizes, placement, equivalence with an independent grouped implementation, LRN, init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from grouped_reference import grouped_forward, lrn_by_formula, spatial_norm_by_formula
from repro import speed
from repro.config import SpeedConfig
from repro.data import Augment
from repro.measure import CrossDeviceCopies, exchange_rounds
from repro.model import (PRESETS, AlexNet, LocalResponseNorm, SpatialResponseNorm, Tower, load_grouped_state_dict,
                         resolve_options, to_grouped_state_dict)

CAFFE_SHAPES = {
    "conv1.weight": (96, 3, 11, 11), "conv2.weight": (256, 48, 5, 5), "conv3.weight": (384, 256, 3, 3),
    "conv4.weight": (384, 192, 3, 3), "conv5.weight": (256, 192, 3, 3), "fc6.weight": (4096, 9216),
    "fc7.weight": (4096, 4096), "fc8.weight": (1000, 4096),
}

# Every option away from each preset's value, one at a time, plus both presets as they are.
VARIANTS = [
    ("paper", {}),
    ("cuda_convnet", {}),
    ("paper", {"lrn": False}),
    ("paper", {"lrn_position": "before_relu"}),
    ("paper", {"lrn_alpha_over_n": True}),
    ("paper", {"spatial_norm": True}),
    ("paper", {"overlap_pool": False}),
    ("paper", {"towers": 1}),
    ("paper", {"dropout": False}),
    ("paper", {"dropout_style": "inverted"}),
    ("paper", {"conv1_padding": "symmetric2"}),
    ("cuda_convnet", {"lrn": False}),
    ("cuda_convnet", {"overlap_pool": False}),
    ("cuda_convnet", {"towers": 1}),
]
VARIANT_IDS = [f"{preset}-" + ",".join(f"{k}={v}" for k, v in over.items()) for preset, over in VARIANTS]


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def images(batch=2, seed=0):
    """Inputs on the scale the network sees: raw 0-255 pixels minus the mean."""
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 60


def random_grouped_state_dict(model, seed=1):
    """Random weights and (non-constant) biases in the model's grouped layout, so every bias split is checked."""
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=gen) * (0.03 if key.endswith("weight") else 0.5)
            for key, value in to_grouped_state_dict(model).items()}


def capture_dropout_masks(model):
    """Forward hooks that record each tower's fc6/fc7 keep masks, so the reference can use the same ones.

    A unit that was kept has a non-zero output unless its input was zero, in which case the mask does not matter."""
    masks = {6: [], 7: []}
    for tower in model.towers:
        for layer in (6, 7):
            getattr(tower, f"dropout{layer}").register_forward_hook(
                lambda mod, inp, out, layer=layer: masks[layer].append((out != 0).to(out.dtype)))
    return lambda: (torch.cat(masks[6], dim=1), torch.cat(masks[7], dim=1))


def test_parameter_count_two_towers():
    assert num_params(AlexNet()) == 60_965_224
    assert num_params(AlexNet(preset="cuda_convnet")) == 60_965_224


def test_parameter_count_one_tower():
    # §3.2's one-GPU net: convs 48-128-192-192-256, fc 4096-4096-1000 (derivation in docs/fidelity.md).
    assert num_params(AlexNet(towers=1)) == 59_798_312


@pytest.mark.parametrize("overrides, expected", [
    ({}, [(48, 55, 55), (48, 27, 27), (128, 27, 27), (128, 13, 13), (192, 13, 13), (192, 13, 13),
          (128, 13, 13), (128, 6, 6)]),
    # run #147 of the 2012 code: maps 55 -> 28, 26 -> 13, 11 -> 6
    ({"overlap_pool": False}, [(48, 55, 55), (48, 28, 28), (128, 26, 26), (128, 13, 13), (192, 13, 13),
                               (192, 13, 13), (128, 11, 11), (128, 6, 6)]),
    ({"towers": 1}, [(48, 55, 55), (48, 27, 27), (128, 27, 27), (128, 13, 13), (192, 13, 13), (192, 13, 13),
                     (256, 13, 13), (256, 6, 6)]),
    ({"conv1_padding": "symmetric2"}, [(48, 55, 55), (48, 27, 27), (128, 27, 27), (128, 13, 13), (192, 13, 13),
                                       (192, 13, 13), (128, 13, 13), (128, 6, 6)]),
])
def test_activation_shapes(overrides, expected):
    model = AlexNet(**overrides).eval()
    with torch.no_grad():
        tower = model.towers[0]
        recorded = []
        hooks = [getattr(tower, name).register_forward_hook(
            lambda m, i, o, name=name: recorded.append((name, tuple(o.shape[1:]))))
            for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "pool")]
        logits = model(images(1))
        for hook in hooks:
            hook.remove()
    # conv and pool hooks fire in execution order: conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5
    assert [shape for _, shape in recorded] == expected
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_placement_on_two_fake_gpus(training):
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:0", "cuda:1")).train(training)
        for t, tower in enumerate(model.towers):
            assert {str(p.device) for p in tower.parameters()} == {f"cuda:{t}"}
        assert {str(p.device) for p in model.fc8.parameters()} == {"cuda:0"}
        x = torch.empty(2, 3, 224, 224, device="cuda:0")
        with CrossDeviceCopies() as recorder:
            logits = model(x)
    assert str(logits.device) == "cuda:0" and tuple(logits.shape) == (2, 1000)
    to1, to0 = ("cuda:0", "cuda:1"), ("cuda:1", "cuda:0")
    expected = [
        (*to1, (2, 3, 224, 224)),  # the image, to tower 1
        (*to1, (2, 128, 13, 13)), (*to0, (2, 128, 13, 13)),  # pool2 both ways, before conv3
        (*to1, (2, 4608)), (*to0, (2, 4608)),  # pool5 both ways, before fc6
        (*to1, (2, 2048)), (*to0, (2, 2048)),  # fc6 both ways, before fc7
        (*to0, (2, 2048)),  # tower 1's fc7, to fc8 on cuda:0
    ]
    assert sorted(recorder.copies) == sorted(expected)


def sorted_rounds(rounds):
    return [sorted(copies) for copies in rounds]


@pytest.mark.parametrize("training, options", [(True, SpeedConfig()), (False, SpeedConfig()),
                                               (True, SpeedConfig(autocast="bf16"))], ids=["train", "eval", "bf16"])
def test_every_copy_of_an_exchange_is_queued_before_the_next_stage_computes(training, options):
    # A copy between GPUs waits for everything queued on both GPUs (ATen's copy_device_to_device); dispatched after a
    # tower's next layers it would hold the other tower back until they finished, and the towers would take turns.
    with FakeTensorMode():
        model = speed.apply(AlexNet(devices=("cuda:0", "cuda:1")), options).train(training)
        inputs = [torch.empty(2, 3, 224, 224, device=d) for d in ("cuda:0", "cuda:1")]
        with CrossDeviceCopies() as recorder:
            model(inputs)
    assert sorted_rounds(recorder.rounds) == sorted_rounds(exchange_rounds(2, model.devices))


def test_ten_patch_evaluation_queues_each_exchange_at_once(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # host memory: nothing to fake without CUDA
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AlexNet(devices=("cuda:0", "cuda:1")).eval()
        augment = Augment(np.zeros((256, 256, 3)), np.ones(3), np.eye(3), devices=model.devices)
        views = augment.test_views(torch.zeros(2, 256, 256, 3, dtype=torch.uint8), ten_crop=True)
        with CrossDeviceCopies() as recorder:
            model(views)  # what repro.evaluate.evaluate calls
    assert sorted_rounds(recorder.rounds) == sorted_rounds(exchange_rounds(20, model.devices))


def test_one_image_tensor_is_sent_to_tower_1_before_anything_computes_and_the_grouped_path_copies_nothing():
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:0", "cuda:1"))
        with CrossDeviceCopies() as recorder:
            model(torch.empty(2, 3, 224, 224, device="cuda:0"))
        grouped = speed.apply(AlexNet(devices=("cuda:0", "cuda:0")), SpeedConfig(grouped=True))
        with CrossDeviceCopies() as on_one_gpu:
            grouped(torch.empty(2, 3, 224, 224, device="cuda:0"))
    image = [[("cuda:0", "cuda:1", (2, 3, 224, 224))]]
    assert sorted_rounds(recorder.rounds) == image + sorted_rounds(exchange_rounds(2, model.devices))
    assert on_one_gpu.rounds == []


class RandomOps(TorchDispatchMode):
    """Records the device of every tensor a random op fills."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "normal" in func.__name__ or "randn" in func.__name__ or "bernoulli" in func.__name__:
            self.devices.append(str(out.device))
        return out


def test_weights_are_drawn_on_the_cpu_so_two_gpus_get_different_towers():
    # Each GPU's generator gets the same seed: drawing there would give both towers the same weights.
    with FakeTensorMode():
        with RandomOps() as recorder:
            AlexNet(devices=("cuda:0", "cuda:1"))
    assert recorder.devices and set(recorder.devices) == {"cpu"}
    torch.manual_seed(3)
    a = to_grouped_state_dict(AlexNet())
    torch.manual_seed(3)
    b = to_grouped_state_dict(AlexNet())
    assert all(torch.equal(a[k], b[k]) for k in a)  # a seed fixes the network
    assert not torch.equal(a["conv1.weight"][:48], a["conv1.weight"][48:])  # and the towers differ


@pytest.mark.parametrize("preset, towers", [("paper", 2), ("cuda_convnet", 2), ("paper", 1)])
def test_a_seed_gives_the_same_weights_whatever_the_layers_default_init_draws(monkeypatch, preset, towers):
    # A tower built on a GPU runs its layers' default initialisation on that GPU's generator, leaving the CPU
    # generator where it was; on the CPU it advances it. Reproduced on the CPU by turning that default off.
    torch.manual_seed(5)
    on_cpu = AlexNet(preset=preset, towers=towers)
    after_cpu = torch.get_rng_state()
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    torch.manual_seed(5)
    as_on_gpu = AlexNet(preset=preset, towers=towers)
    for (name, expected), got in zip(on_cpu.state_dict().items(), as_on_gpu.state_dict().values()):
        assert torch.equal(got, expected), name  # every weight and bias of both towers and fc8
    assert torch.equal(torch.get_rng_state(), after_cpu)  # and what is drawn next is the same too


def test_per_tower_inputs_cross_no_device():
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:0", "cuda:1"))
        inputs = [torch.empty(2, 3, 224, 224, device=d) for d in ("cuda:0", "cuda:1")]
        with CrossDeviceCopies() as recorder:
            logits = model(inputs)
    assert str(logits.device) == "cuda:0"
    assert all(shape != (2, 3, 224, 224) for _, _, shape in recorder.copies) and len(recorder.copies) == 7
    with pytest.raises(ValueError, match="got 1 inputs for 2 tower"):
        AlexNet()([images(1)])


def test_conv1_input_is_made_once_per_input_tensor(monkeypatch):
    # Towers on one device share the batch, so they share the padded copy conv1 keeps; on two devices each its own.
    padded = []
    original = Tower.conv1_input
    monkeypatch.setattr(Tower, "conv1_input", lambda tower, x: padded.append(x) or original(tower, x))
    model, x = AlexNet(), images(1)
    shared = model.conv1_inputs([x, x])
    assert len(padded) == 1 and shared[0] is shared[1] and shared[0].shape == (1, 3, 227, 227)
    model(x)  # the forward pass too
    assert len(padded) == 2
    with FakeTensorMode():
        inputs = [torch.empty(1, 3, 224, 224, device=d) for d in ("cuda:0", "cuda:1")]
        own = AlexNet(devices=("cuda:0", "cuda:1")).conv1_inputs(inputs)
    assert len(padded) == 4 and [str(t.device) for t in own] == ["cuda:0", "cuda:1"]


def test_one_tower_net_lives_on_the_first_device():
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:1", "cuda:0"), towers=1)
        assert {str(p.device) for p in model.parameters()} == {"cuda:1"}
        with CrossDeviceCopies() as recorder:
            logits = model(torch.empty(2, 3, 224, 224, device="cuda:1"))
    assert str(logits.device) == "cuda:1" and recorder.copies == []


def test_input_from_another_device_reaches_both_towers():
    with FakeTensorMode():
        model = AlexNet(devices=("cuda:0", "cuda:1"))
        with CrossDeviceCopies() as recorder:
            model(torch.empty(1, 3, 224, 224))  # on the CPU
    image_copies = [c for c in recorder.copies if c[2] == (1, 3, 224, 224)]
    assert sorted(image_copies) == [("cpu", "cuda:0", (1, 3, 224, 224)), ("cpu", "cuda:1", (1, 3, 224, 224))]


def test_grouped_state_dict_shapes_and_round_trip():
    model = AlexNet()
    sd = to_grouped_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items() if k.endswith("weight")} == CAFFE_SHAPES
    # channel block 0 is tower 0, and fc6's input is tower 0's pool5 then tower 1's
    assert torch.equal(sd["conv2.weight"][:128], model.towers[0].conv2.weight)
    assert torch.equal(sd["conv2.weight"][128:], model.towers[1].conv2.weight)
    assert torch.equal(sd["fc6.weight"][2048:], model.towers[1].fc6.weight)
    other = AlexNet()
    new = random_grouped_state_dict(other)
    load_grouped_state_dict(other, new)
    back = to_grouped_state_dict(other)
    assert all(torch.equal(back[k], new[k]) for k in new)


def test_load_grouped_state_dict_rejects_wrong_keys_and_shapes():
    model = AlexNet()
    sd = to_grouped_state_dict(model)
    with pytest.raises(ValueError, match="missing \\['fc8.bias'\\]"):
        load_grouped_state_dict(model, {k: v for k, v in sd.items() if k != "fc8.bias"})
    with pytest.raises(ValueError, match="conv1.weight has shape \\[96, 3, 5, 5\\]"):
        load_grouped_state_dict(model, {**sd, "conv1.weight": torch.zeros(96, 3, 5, 5)})


@pytest.mark.parametrize("preset, overrides", VARIANTS, ids=VARIANT_IDS)
def test_towers_equal_grouped_reference(preset, overrides):
    model = AlexNet(preset=preset, **overrides)
    options = resolve_options(preset, **overrides)
    sd = random_grouped_state_dict(model)
    load_grouped_state_dict(model, sd)
    x = images()
    with torch.no_grad():
        model.eval()
        expected = grouped_forward(sd, x, options, training=False)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        model.train()
        masks = capture_dropout_masks(model) if options["dropout"] else lambda: None
        got = model(x)
        expected = grouped_forward(sd, x, options, training=True, masks=masks())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_sgd_step_equals_grouped_reference(preset):
    model = AlexNet(preset=preset).train()
    options = resolve_options(preset)
    sd = random_grouped_state_dict(model)
    load_grouped_state_dict(model, sd)
    x, labels = images(4), torch.tensor([3, 1, 4, 1])
    masks = capture_dropout_masks(model)
    F.cross_entropy(model(x), labels).backward()
    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4).step()

    ref = {k: v.clone().requires_grad_() for k, v in sd.items()}
    F.cross_entropy(grouped_forward(ref, x, options, training=True, masks=masks()), labels).backward()
    torch.optim.SGD(ref.values(), lr=0.01, momentum=0.9, weight_decay=5e-4).step()

    after = to_grouped_state_dict(model)
    for key in sd:
        step, ref_step = after[key] - sd[key], ref[key].detach() - sd[key]
        assert ref_step.abs().max() > 0, key
        torch.testing.assert_close(step, ref_step, rtol=1e-3, atol=1e-3 * ref_step.abs().max().item(), msg=key)


@pytest.mark.parametrize("alpha_over_n, paper_alpha", [(False, 1e-4), (True, 1e-4 / 5)])
def test_lrn_matches_the_papers_formula(alpha_over_n, paper_alpha):
    # Large activations so the normaliser matters; 48 channels, as in one tower's conv1.
    a = torch.randn(2, 48, 3, 3, dtype=torch.float64) * 40
    lrn = LocalResponseNorm(48, alpha_over_n)
    expected = lrn_by_formula(a, groups=1, alpha=paper_alpha)
    torch.testing.assert_close(lrn(a), expected, rtol=1e-12, atol=0)
    # The channel edges by hand: channel 0 sums channels 0..2, channel 47 sums 45..47, channel 10 sums 8..12.
    for c, window in ((0, slice(0, 3)), (47, slice(45, 48)), (10, slice(8, 13))):
        by_hand = a[:, c] / (2 + paper_alpha * (a[:, window] ** 2).sum(1)) ** 0.75
        torch.testing.assert_close(lrn(a)[:, c], by_hand, rtol=1e-12, atol=0)
    # and PyTorch's own layer, with the alpha each convention implies
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4 if alpha_over_n else 5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(lrn(a), torch_lrn(a), rtol=1e-12, atol=0)
    assert LocalResponseNorm(48, alpha_over_n).state_dict() == {}  # nothing learned, nothing saved


def test_lrn_stays_within_each_tower():
    model = AlexNet().eval()
    x = images(1)
    with torch.no_grad():
        before = model.towers[0].stem(model.towers[0].conv1_input(x))
        model.towers[1].conv1.weight.mul_(100.0)  # tower 1's maps change wildly; tower 0's LRN must not notice
        after = model.towers[0].stem(model.towers[0].conv1_input(x))
    assert torch.equal(before, after)


def test_spatial_norm_matches_the_2012_codes_formula():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64) * 30
    torch.testing.assert_close(SpatialResponseNorm()(x), spatial_norm_by_formula(x), rtol=1e-12, atol=1e-12)
    # the corner pixel of map 0 by hand: its window is the 3x3 block in the corner
    by_hand = x[0, 0, 0, 0] / (1 + 1e-3 / 25 * (x[0, 0, :3, :3] ** 2).sum()) ** 0.75
    torch.testing.assert_close(SpatialResponseNorm()(x)[0, 0, 0, 0], by_hand)


def test_paper_dropout_scales_at_test_time_only():
    model = AlexNet()
    dropout = model.towers[0].dropout6
    x = torch.rand(64, 2048) + 1.0
    assert torch.equal(dropout.eval()(x), x * 0.5)
    out = dropout.train()(x)
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # no 1/(1-p) scaling while training
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    inverted = AlexNet(dropout_style="inverted").towers[0].dropout6
    assert torch.equal(inverted.eval()(x), x)
    out = inverted.train()(x)
    torch.testing.assert_close(out[out != 0], 2 * x[out != 0])


@pytest.mark.parametrize("preset, deep_std", [("paper", 0.01), ("cuda_convnet", 0.03)])
def test_initialisation(preset, deep_std):
    model = AlexNet(preset=preset)
    sd = to_grouped_state_dict(model)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        weight, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]
        std = deep_std if name in ("conv3", "conv4", "conv5") else 0.01
        # the sample std of n normal draws is within 6 / sqrt(2n) of the true one with overwhelming probability
        assert abs(weight.std().item() - std) < std * 6 / math.sqrt(2 * weight.numel()), name
        assert abs(weight.mean().item()) < std * 6 / math.sqrt(weight.numel()), name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(bias == expected_bias), name
    assert torch.all(to_grouped_state_dict(AlexNet(init_bias=0.1))["fc6.bias"] == 0.1)


def test_presets_differ_only_in_the_2012_codes_choices():
    paper, code = PRESETS["paper"], PRESETS["cuda_convnet"]
    assert {k for k in paper if paper[k] != code[k]} == {"lrn_position", "lrn_alpha_over_n", "spatial_norm", "init"}


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "caffe"}, "unknown model preset 'caffe'"),
    ({"lrn_size": 3}, "unknown model option\\(s\\) \\['lrn_size'\\]"),
    ({"towers": 3}, "towers=3 is not one of \\[1, 2\\]"),
    ({"dropout_style": "gaussian"}, "dropout_style='gaussian' is not one of"),
    ({"devices": ("cpu",)}, "devices must name two devices"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlexNet(**kwargs)


def test_width_narrows_every_layer_and_nothing_else():
    full, narrow = AlexNet(num_classes=10), AlexNet(num_classes=10, width=0.125)
    assert num_params(full) > 56e6 and num_params(narrow) < 1e6  # fc8 with 10 classes: 4M fewer
    for (name, a), b in zip(full.named_parameters(), narrow.parameters()):
        assert a.dim() == b.dim() and (a.shape[2:] == b.shape[2:]), name  # the same kernels, fewer of them
    assert [t.conv1.out_channels for t in narrow.towers] == [6, 6] and narrow.fc8.in_features == 512
    assert narrow(images(2)).shape == (2, 10)
    assert AlexNet(width=1e-9).towers[0].conv1.out_channels == 1  # at least one unit
    with pytest.raises(ValueError, match="width=0"):
        AlexNet(width=0)
