"""The response normalisations and max pooling as autograd Functions (repro/model.py): the forward values of the
plain formulas bit for bit, gradients of autograd's within float32 rounding, gradcheck in float64, what they keep
for the backward pass, autocast, and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from repro import model, speed
from repro.config import SpeedConfig
from repro.model import (BACKWARD_SAMPLES_CPU, LRN_BETA, LRN_K, SPATIAL_NORM_POW, SPATIAL_NORM_SCALE, AlexNet,
                         LocalResponseNorm, MaxPool, ResponseNormalisation, SpatialResponseNorm, spatial_mean)
from test_model import images

# Every LRN variant the model has: both alpha conventions, one tower (groups=1) and the grouped network (2).
LRN_VARIANTS = [(alpha_over_n, groups) for alpha_over_n in (False, True) for groups in (1, 2)]
LRN_IDS = [f"alpha_over_n={a}-groups={g}" for a, g in LRN_VARIANTS]


def lrn_formula(lrn: LocalResponseNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The layer as plain ops, as it was computed before the Function (autograd differentiates it)."""
    band = lrn.band.to(x.dtype)
    band = band.repeat(groups, 1, 1, 1) if groups > 1 else band
    return x / (LRN_K + lrn.alpha * F.conv2d(x * x, band, groups=groups)).pow(LRN_BETA)


def spatial_formula(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + SPATIAL_NORM_SCALE * spatial_mean(x * x)).pow(SPATIAL_NORM_POW)


def activations(shape, dtype=torch.float32, relu=True, seed=0) -> torch.Tensor:
    """Activations of the size the normalisers see (tens), so that the normaliser matters; after a ReLU, half
    are exact zeros."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype) * 40
    return x.relu() if relu else x


def worst_relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("alpha_over_n, groups", LRN_VARIANTS, ids=LRN_IDS)
@pytest.mark.parametrize("relu", [True, False], ids=["after_relu", "before_relu"])
def test_lrn_forward_is_the_formula_bit_for_bit(alpha_over_n, groups, relu):
    # A tower's conv1 maps (48 x 55 x 55) and conv2 maps (128 x 27 x 27), batch 2; channels-last input as well.
    for channels, size in ((48, 55), (128, 27)):
        lrn = LocalResponseNorm(channels, alpha_over_n)
        x = activations((2, channels * groups, size, size), relu=relu)
        assert torch.equal(lrn(x, groups), lrn_formula(lrn, x, groups))
        x = x.contiguous(memory_format=torch.channels_last)  # `speed.channels_last`: another convolution kernel
        assert torch.equal(lrn(x, groups), lrn_formula(lrn, x, groups))
    x64 = activations((2, 16 * groups, 7, 7), torch.float64, relu=relu)
    assert torch.equal(LocalResponseNorm(16, alpha_over_n)(x64, groups),
                       lrn_formula(LocalResponseNorm(16, alpha_over_n), x64, groups))


@pytest.mark.parametrize("alpha_over_n, groups", LRN_VARIANTS, ids=LRN_IDS)
@pytest.mark.parametrize("relu", [True, False], ids=["after_relu", "before_relu"])
def test_lrn_gradient_is_autograds_within_float32_rounding(alpha_over_n, groups, relu):
    # the CPU backward's slices of BACKWARD_SAMPLES_CPU samples and a shorter last one
    lrn = LocalResponseNorm(48, alpha_over_n)
    x = activations((BACKWARD_SAMPLES_CPU + 3, 48 * groups, 13, 13), relu=relu).requires_grad_()
    grad = torch.randn_like(x)
    got, = torch.autograd.grad(lrn(x, groups), x, grad)
    expected, = torch.autograd.grad(lrn_formula(lrn, x, groups), x, grad)
    assert worst_relative(got, expected) < 2e-6  # measured ~2e-7: float32's 2^-24 times a few operations
    # and against the formula's gradient in float64, which both only approximate
    x64 = x.detach().double().requires_grad_()
    exact, = torch.autograd.grad(lrn_formula(lrn, x64, groups), x64, grad.double())
    assert worst_relative(got.double(), exact) < 2e-6


@pytest.mark.parametrize("alpha_over_n, groups", LRN_VARIANTS, ids=LRN_IDS)
def test_lrn_passes_gradcheck_in_float64(alpha_over_n, groups, monkeypatch):
    monkeypatch.setattr(model, "BACKWARD_SAMPLES_CPU", 2)  # batch 3: a slice of two samples and one of one
    lrn = LocalResponseNorm(7, alpha_over_n)  # 7 maps: windows clipped at both ends and whole ones between
    for relu in (True, False):
        x = activations((3, 7 * groups, 3, 3), torch.float64, relu=relu).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: lrn(t, groups), (x,))


def test_the_function_passes_gradcheck_for_another_power():
    # The normalisations use beta = 3/4 (its backward takes square roots); any other power takes torch.pow.
    x = activations((3, 6, 3, 3), torch.float64, relu=False).requires_grad_()
    sums = lambda t: F.conv2d(t, torch.ones(6, 6, 1, 1, dtype=torch.float64))  # noqa: E731 (a symmetric window)
    for beta in (0.75, 0.5):
        assert torch.autograd.gradcheck(lambda t: ResponseNormalisation.apply(t, sums, sums, 2.0, 1e-3, beta), (x,))


def test_spatial_norm_forward_is_the_formula_and_its_gradient_autograds(monkeypatch):
    norm = SpatialResponseNorm()
    x = activations((BACKWARD_SAMPLES_CPU + 3, 8, 13, 13)).requires_grad_()
    assert torch.equal(norm(x), spatial_formula(x))
    grad = torch.randn_like(x)
    got, = torch.autograd.grad(norm(x), x, grad)
    expected, = torch.autograd.grad(spatial_formula(x), x, grad)
    assert worst_relative(got, expected) < 2e-6
    monkeypatch.setattr(model, "BACKWARD_SAMPLES_CPU", 2)
    x64 = activations((3, 3, 6, 6), torch.float64, relu=False).requires_grad_()
    assert torch.autograd.gradcheck(norm, (x64,))


def saved_for_backward(layer, x: torch.Tensor) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


def test_the_normalisations_keep_only_their_input_for_the_backward_pass():
    # The formula left to autograd keeps x^2, the normaliser and its power: three maps besides the input.
    lrn = LocalResponseNorm(48, False)
    for layer, channels in ((lrn, 48), (lambda t: lrn(t, 2), 96), (SpatialResponseNorm(), 48)):
        x = activations((2, channels, 13, 13)).requires_grad_()
        saved = saved_for_backward(layer, x)
        assert len(saved) == 1 and saved[0] is x
    maps = {t.data_ptr() for t in saved_for_backward(lambda t: lrn_formula(lrn, t, 1), x) if t.shape == x.shape}
    assert len(maps) == 4


def test_a_second_derivative_fails_instead_of_being_wrong():
    x = activations((2, 8, 4, 4), torch.float64).requires_grad_()
    grad = torch.randn_like(x, requires_grad=True)
    first, = torch.autograd.grad(LocalResponseNorm(8, False)(x), x, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()


# Every normalisation the model has, with its plain formula: the LRN variants and the 2012 code's spatial norm.
NORMALISATIONS = {**{name: (lambda a, g: (lambda x: LocalResponseNorm(48, a)(x, g),
                                          lambda x: lrn_formula(LocalResponseNorm(48, a), x, g)))(a, g)
                     for name, (a, g) in zip(LRN_IDS, LRN_VARIANTS)},
                  "spatial_norm": (SpatialResponseNorm(), spatial_formula)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NORMALISATIONS)
def test_autocast_computes_every_normalisation_in_a_float32_island(name, dtype):
    layer, formula = NORMALISATIONS[name]
    channels = 96 if name.endswith("groups=2") else 48
    x = activations((2, channels, 9, 9)).to(dtype).requires_grad_()
    grad = torch.randn(x.shape).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    # computed in float32 and rounded once: bf16 or fp16 arithmetic inside would round every op
    assert out.dtype == dtype and torch.equal(out, layer(x.detach().float()).to(dtype))
    got, = torch.autograd.grad(out, x, grad)
    x32 = x.detach().float().requires_grad_()
    expected, = torch.autograd.grad(formula(x32), x32, grad.float())
    assert got.dtype == dtype
    assert worst_relative(got.float(), expected) < 2**-7  # the gradient's own rounding to bf16 or fp16, no more


@pytest.mark.parametrize("size, stride, ceil_mode", [(3, 2, False), (2, 2, True)], ids=["overlapping", "2x2-ceil"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_max_pool_is_torchs_bit_for_bit_and_keeps_only_the_positions(size, stride, ceil_mode, channels_last):
    # after a ReLU: many windows of zeros, where the tie rule decides which position gets the gradient
    x = activations((3, 48, 27, 27))
    x[0, 0, :4, :4] = 5.0  # and ties between equal positive values
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    pool = MaxPool(size, stride, ceil_mode)
    out = pool(x)
    expected = F.max_pool2d(x, size, stride, ceil_mode=ceil_mode)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    saved = saved_for_backward(pool, x)
    assert [t.dtype for t in saved] == [torch.int64]  # the positions, not the input


def test_every_lrn_and_pool_of_the_network_is_the_function():
    model = AlexNet(preset="cuda_convnet")
    for tower in model.towers:
        assert isinstance(tower.lrn1, LocalResponseNorm) and isinstance(tower.lrn2, LocalResponseNorm)
        assert isinstance(tower.spatial_norm, SpatialResponseNorm) and isinstance(tower.pool, MaxPool)


@pytest.mark.parametrize("name", NORMALISATIONS)
def test_the_compiled_formulation_computes_the_same_layer(name, monkeypatch):
    # What a compiled region traces (the formula with matrix-product sums, torch's pooling), run eagerly here.
    layer, pool = NORMALISATIONS[name][0], MaxPool(3, 2)
    channels = 96 if name.endswith("groups=2") else 48
    x = activations((BACKWARD_SAMPLES_CPU + 3, channels, 13, 13)).requires_grad_()
    grad = torch.randn(BACKWARD_SAMPLES_CPU + 3, channels, 6, 6)
    expected = pool(layer(x))
    expected_grad, = torch.autograd.grad(expected, x, grad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = pool(layer(x))
    assert worst_relative(got, expected) < 2e-6
    assert worst_relative(torch.autograd.grad(got, x, grad)[0], expected_grad) < 2e-6
    assert len(saved_for_backward(layer, x)) > 1  # autograd's own graph, not the Function


def compiled_training_step(model: AlexNet, x, labels):
    logits = model(x)
    F.cross_entropy(logits, labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


@pytest.mark.slow  # compiles the grouped network's forward and backward: a minute or two on two cores
def test_compiled_grouped_training_step_gives_the_eager_gradients():
    torch.manual_seed(0)
    eager = AlexNet(dropout=False)  # compiled dropout draws other masks; without it the step is deterministic
    compiled = speed.apply(copy.deepcopy(eager), SpeedConfig(grouped=True, compile=True))
    x, labels = images(2), torch.tensor([3, 999])
    try:
        logits, grads = compiled_training_step(compiled.train(), x, labels)
    except Exception as error:  # noqa: BLE001 (Inductor needs a working C++ compiler)
        pytest.skip(f"torch.compile does not work on this machine: {type(error).__name__}: {error}"[:300])
    expected_logits, expected_grads = compiled_training_step(eager.train(), x, labels)
    assert worst_relative(logits, expected_logits) < 1e-5
    for name, grad in expected_grads.items():
        assert worst_relative(grads[name], grad) < 1e-4, name
