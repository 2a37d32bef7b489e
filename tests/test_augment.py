"""The paper's augmentation on the device: crops, flips, colour noise, mean subtraction, and the test views."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from repro import speed
from repro.config import SpeedConfig
from repro.data import Augment, step_rng
from repro.measure import CrossDeviceCopies
from repro.model import AlexNet

EIGVALS = np.array([5000.0, 300.0, 40.0])
EIGVECS = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]


def make_augment(**kwargs):
    mean = np.random.default_rng(1).uniform(0, 255, size=(256, 256, 3))
    return Augment(mean, EIGVALS, EIGVECS, **kwargs)


def coordinate_images(batch=2):
    """uint8 images whose pixels say where they are: channel 0 = row, channel 1 = column, channel 2 = image."""
    rows, cols = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    out = np.stack([np.stack([rows, cols, np.full_like(rows, b)], axis=-1) for b in range(batch)])
    return torch.from_numpy(out.astype(np.uint8))  # rows and columns wrap at 256, which crops never reach


def test_crop_and_flip_take_the_right_pixels():
    aug = make_augment(pca_lighting=False)
    images = coordinate_images(4)
    rng = np.random.default_rng(5)
    params = aug.draw(4, np.random.default_rng(5))
    x = aug.train(images, rng)[0] + aug.mean[:, 16:240, 16:240]  # undo the (central) mean subtraction
    for b in range(4):
        oy, ox = params["offsets"][b].tolist()
        expected = images[b, oy:oy + 224, ox:ox + 224].permute(2, 0, 1).float()
        if params["flips"][b]:
            expected = expected.flip(-1)
        torch.testing.assert_close(x[b], expected, rtol=0, atol=1e-4)


def test_offsets_and_flips_are_uniform():
    aug = make_augment()
    draws = [aug.draw(128, step_rng(0, 0, step)) for step in range(200)]
    offsets = torch.cat([d["offsets"] for d in draws]).numpy()
    flips = torch.cat([d["flips"] for d in draws]).numpy()
    n = len(offsets)
    for axis in (0, 1):
        counts = np.bincount(offsets[:, axis], minlength=33)
        assert len(counts) == 33 and offsets[:, axis].min() == 0 and offsets[:, axis].max() == 32
        # chi-square with 32 degrees of freedom; 80 is far beyond its 99.99th percentile (about 67)
        chi2 = ((counts - n / 33) ** 2 / (n / 33)).sum()
        assert chi2 < 80, (axis, chi2)
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)


def test_chunked_crops_share_offset_and_flip_per_32_images():
    aug = make_augment(crop_chunk=32)
    params = aug.draw(128, np.random.default_rng(3))
    offsets, flips = params["offsets"].view(4, 32, 2), params["flips"].view(4, 32)
    assert torch.all(offsets == offsets[:, :1]) and torch.all(flips == flips[:, :1])
    assert len({tuple(o) for o in offsets[:, 0].tolist()}) > 1  # but chunks differ from each other
    assert params["alphas"].unique(dim=0).shape[0] == 128  # the colour noise stays per image


@pytest.mark.parametrize("style", ["paper", "cuda_convnet"])
def test_pca_noise_has_the_stated_distribution(style):
    aug = make_augment(lighting_style=style)
    grey = torch.full((64, 256, 256, 3), 128, dtype=torch.uint8)
    without = make_augment(pca_lighting=False)
    # paper: eigenvalues of [0, 1]-scale pixels, noise back on the 0-255 scale; 2012 code: sqrt of 0-255 ones
    scale = torch.tensor(EIGVALS / 255**2 * 255 if style == "paper" else np.sqrt(EIGVALS))
    for step in range(4):  # what train() adds is exactly the drawn alphas through the scaled eigenvectors
        x = aug.train(grey, step_rng(0, 0, step))[0]
        alphas = aug.draw(64, step_rng(0, 0, step))["alphas"].double()
        base = without.train(grey, step_rng(0, 0, step))[0]
        if style == "cuda_convnet":
            x = x * 1.1  # the 2012 code divides the training batch by 1 + 0.1
        noise = x - base
        assert torch.allclose(noise, noise[:, :, :1, :1].expand_as(noise), atol=1e-3)  # one RGB offset per image
        torch.testing.assert_close(noise[:, :, 0, 0].double(), alphas * scale @ torch.tensor(EIGVECS).T,
                                   rtol=1e-4, atol=1e-3)
    # so its distribution is that of the draws: alpha ~ N(0, 0.1), 7,680 draws per component
    alphas = torch.cat([aug.draw(64, step_rng(0, 0, step))["alphas"].double() for step in range(120)])
    assert torch.all((alphas.std(0) - 0.1).abs() < 0.005) and torch.all(alphas.mean(0).abs() < 0.005)
    # projected on eigenvector i, the noise has std 0.1 * scale_i
    projected = (alphas * scale @ torch.tensor(EIGVECS).T) @ torch.tensor(EIGVECS)
    torch.testing.assert_close(projected.std(0), 0.1 * scale, rtol=0.05, atol=0)


def test_mean_subtraction_center_versus_aligned():
    images = torch.zeros(8, 256, 256, 3, dtype=torch.uint8)
    center = make_augment(pca_lighting=False, mean_crop="center")
    aligned = make_augment(pca_lighting=False, mean_crop="aligned")
    params = center.draw(8, np.random.default_rng(2))
    x_center = center.train(images, np.random.default_rng(2))[0]
    x_aligned = aligned.train(images, np.random.default_rng(2))[0]
    mean = center.mean
    for b in range(8):
        torch.testing.assert_close(x_center[b], -mean[:, 16:240, 16:240])
        oy, ox = params["offsets"][b].tolist()
        expected = -mean[:, oy:oy + 224, ox:ox + 224]
        torch.testing.assert_close(x_aligned[b], expected.flip(-1) if params["flips"][b] else expected)


def test_ten_views_are_the_corners_centre_and_their_mirrors():
    aug = make_augment(pca_lighting=False)
    images = coordinate_images(2)
    views = aug.test_views(images, ten_crop=True)[0] + aug.mean[:, 16:240, 16:240]
    assert views.shape == (20, 3, 224, 224)
    positions = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    for b in range(2):
        for v, (flip, (oy, ox)) in enumerate((f, p) for f in (False, True) for p in positions):
            expected = images[b, oy:oy + 224, ox:ox + 224].permute(2, 0, 1).float()
            torch.testing.assert_close(views[b * 10 + v], expected.flip(-1) if flip else expected, rtol=0, atol=1e-4)
    centre = aug.test_views(images, ten_crop=False)[0] + aug.mean[:, 16:240, 16:240]
    torch.testing.assert_close(centre, views[[4, 14]])


def test_test_views_have_no_noise_and_no_rescaling():
    aug = make_augment(lighting_style="cuda_convnet")
    images = torch.full((1, 256, 256, 3), 200, dtype=torch.uint8)
    torch.testing.assert_close(aug.test_views(images, ten_crop=False)[0][0], 200 - aug.mean[:, 16:240, 16:240])


def test_same_step_same_batch_on_any_run():
    aug = make_augment()
    images = coordinate_images(4)
    torch.testing.assert_close(aug.train(images, step_rng(3, 2, 7))[0], aug.train(images, step_rng(3, 2, 7))[0])
    assert not torch.equal(aug.train(images, step_rng(3, 2, 7))[0], aug.train(images, step_rng(3, 2, 8))[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"lighting_style": "fancy"}, "lighting_style"), ({"mean_crop": "left"}, "mean_crop"),
    ({"crop_chunk": 16}, "crop_chunk")])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_augment(**kwargs)


@pytest.mark.parametrize("mean_crop", ["center", "aligned"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_layout_is_what_speed_channels_last_says(mean_crop, channels_last):
    # The gather reads NHWC pixels: a permuted view of it would give every convolution channels-last input.
    aug = make_augment(mean_crop=mean_crop)
    images = coordinate_images(2)
    batches = [aug.train(images, np.random.default_rng(0))[0], aug.test_views(images, ten_crop=True)[0]]
    assert all(x.is_contiguous() for x in batches)
    model = speed.apply(AlexNet(num_classes=10), SpeedConfig(channels_last=channels_last)).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    for tower in model.towers:
        tower.conv1.register_forward_hook(lambda module, inputs, output: seen.extend([inputs[0], output]))
    with torch.no_grad():
        model(batches[0])
    assert len(seen) == 4 and all(x.is_contiguous(memory_format=layout) for x in seen)


def test_each_tower_gets_its_input_built_on_its_own_device(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # host memory: nothing to fake without CUDA
    with FakeTensorMode(allow_non_fake_inputs=True):
        aug = make_augment(devices=("cuda:0", "cuda:1"), lighting_style="cuda_convnet")
        images = torch.zeros(2, 256, 256, 3, dtype=torch.uint8)
        with CrossDeviceCopies() as recorder:
            inputs = aug.train(images, np.random.default_rng(0))
            views = aug.test_views(images, ten_crop=True)
    assert [str(x.device) for x in inputs] == [str(x.device) for x in views] == ["cuda:0", "cuda:1"]
    assert [tuple(x.shape) for x in inputs + views] == [(2, 3, 224, 224)] * 2 + [(20, 3, 224, 224)] * 2
    # only the uint8 batch and the step's draws travel, from the host to each device; nothing between the GPUs
    assert {(src, dst) for src, dst, _ in recorder.copies} == {("cpu", "cuda:0"), ("cpu", "cuda:1")}
    for device in ("cuda:0", "cuda:1"):
        shapes = sorted(shape for _, dst, shape in recorder.copies if dst == device)
        assert shapes == sorted([(2, 256, 256, 3), (2, 2), (2,), (2, 3), (2, 256, 256, 3), (20, 2), (20,)])


def test_towers_sharing_a_device_share_one_input_equal_to_the_single_device_one():
    images = coordinate_images(4)
    one = make_augment(lighting_style="cuda_convnet").train(images, step_rng(0, 1, 2))
    two = make_augment(devices=("cpu", "cpu"), lighting_style="cuda_convnet").train(images, step_rng(0, 1, 2))
    assert len(one) == 1 and len(two) == 2 and two[0] is two[1]
    assert torch.equal(one[0], two[0])
