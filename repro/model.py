"""The network of Krizhevsky, Sutskever & Hinton (NIPS 2012), as two towers on two devices.

Read top to bottom: the fidelity presets, the pieces (response normalisation, dropout), one tower, the whole
network, and the conversion to and from the single-device grouped layout (Caffe's `bvlc_alexnet` shapes).
Section numbers (§) are the paper's; "the 2012 code" is Krizhevsky's cuda-convnet configs layers-145 /
layer-params-145, which produced Table 2.

The paper's two GPUs each hold half of every layer (a "tower"). Tower-local: conv1, conv2, conv4, conv5.
Cross-tower: conv3 and fc6/fc7 read both towers' outputs, fc8 lives on the first device and reads both (§3.2,
Figure 2). Activations cross devices at exactly those four points.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# Every choice on which the paper text and the 2012 code differ (or where the text is silent), one named option
# each. `paper` follows the text wherever it is explicit and the 2012 code where the text is silent;
# `cuda_convnet` is the 2012 code (layers-145). docs/fidelity.md lists the sources.
PRESETS: dict[str, dict] = {
    "paper": dict(
        lrn=True,  # §3.3: response normalisation after conv1 and conv2
        lrn_position="after_relu",  # §3.3: "after applying the ReLU" (the 2012 code: before it, conv1 only)
        lrn_alpha_over_n=False,  # §3.3 formula taken literally: k + alpha * sum(a^2)
        spatial_norm=False,  # not in the paper
        overlap_pool=True,  # §3.4: 3x3 windows, stride 2
        towers=2,  # §3.2: two GPUs
        dropout=True,  # §4.2: p=0.5 on the outputs of fc6 and fc7
        dropout_style="paper",  # §4.2: no scaling while training, outputs x0.5 at test
        conv1_padding="right_bottom3",  # silent in the paper; what the 2012 code effectively did
        init="paper",  # §5: every weight ~ N(0, 0.01)
        init_bias=1.0,  # §5: biases of conv2, conv4, conv5, fc6, fc7 (Caffe fell back to 0.1)
    ),
}
PRESETS["cuda_convnet"] = dict(
    PRESETS["paper"],
    lrn_position="before_relu",  # conv1 -> rnorm1 -> ReLU -> pool1 (conv1 has no neuron of its own)
    lrn_alpha_over_n=True,  # cuda-convnet divides `scale` by `size`: k + (alpha / n) * sum(a^2)
    spatial_norm=True,  # the extra same-map 5x5 `cnorm2` after rnorm2
    init="cuda_convnet",  # initW 0.03 for conv3-conv5
)

CHOICES = {
    "lrn_position": ("after_relu", "before_relu"),
    "dropout_style": ("paper", "inverted"),
    "conv1_padding": ("right_bottom3", "symmetric2"),
    "init": ("paper", "cuda_convnet"),
    "towers": (1, 2),
}

# §3.3: k=2, n=5, alpha=1e-4, beta=0.75, in both the paper and the 2012 code.
LRN_K, LRN_SIZE, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75
# The 2012 code's cnorm2 (type rnorm): x / (1 + (1e-3 / 5^2) * sum over a 5x5 window of the same map)^0.75.
SPATIAL_NORM_SIZE, SPATIAL_NORM_SCALE, SPATIAL_NORM_POW = 5, 1e-3, 0.75
DROPOUT_P = 0.5

# Layer widths per tower: conv1..conv5, fc6, fc7. The one-GPU net of §3.2 halves every conv layer but the last
# and keeps the fully connected layers whole ("biased in favor of the one-GPU net").
TWO_TOWER_WIDTHS = (48, 128, 192, 192, 128, 2048, 2048)
ONE_TOWER_WIDTHS = (48, 128, 192, 192, 256, 4096, 4096)


def resolve_options(preset: str = "paper", **overrides) -> dict:
    """The preset's options with `overrides` applied, every key and value checked."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    options = dict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; the options are {sorted(options)}")
    options.update(overrides)
    for key, allowed in CHOICES.items():
        if options[key] not in allowed:
            raise ValueError(f"model option {key}={options[key]!r} is not one of {list(allowed)}")
    return options


# Samples per slice of the response normalisations' backward pass on CPUs (see `ResponseNormalisation.backward`).
BACKWARD_SAMPLES_CPU = 8


class ResponseNormalisation(torch.autograd.Function):
    """b = a / (k + alpha * W(a^2))^beta for a window sum W that is linear and symmetric (the LRN's band of maps,
    the spatial norm's box), with its gradient in closed form.

    Left to autograd, the formula keeps a^2, the normaliser and its power for the backward pass (three maps besides
    the input) and runs a backward op for each of its ops. Here only the input a is kept: the
    backward recomputes the normaliser d = k + alpha * W(a^2) (a little arithmetic instead of one more map kept
    per layer through the step) and computes, with one more window sum,
        da = g d^-beta - 2 alpha beta a W(g b / d),
    since db_i/da_j = [i=j] d_i^-beta - 2 alpha beta a_j a_i d_i^(-beta-1) for every window i holding j, and W's
    symmetry turns the sum over those windows into W itself.

    `sums` is W as the formula computes it: the forward runs the formula's ops in its order (in place where a
    temporary is not needed again), so its values are the formula's, bit for bit. `backward_sums` may compute W
    any other way (the gradient is exact only up to float rounding anyway)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sums, backward_sums, k: float, alpha: float, beta: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.backward_sums, ctx.k, ctx.alpha, ctx.beta = backward_sums, k, alpha, beta
        denominator = sums(x * x).mul_(alpha).add_(k).pow_(beta)
        return torch.div(x, denominator, out=denominator)

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: a second derivative must fail, not be wrong
    def backward(ctx, grad: torch.Tensor):
        x, = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        # On CPUs a few samples at a time, so that the temporaries stay in the caches (up to 1.8x faster than the
        # whole batch at once for conv1's maps on the test machine); elsewhere the whole batch, in fewer kernels.
        step = BACKWARD_SAMPLES_CPU if x.device.type == "cpu" else x.shape[0]
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            a = x[rows]
            d = ctx.backward_sums(a * a).mul_(ctx.alpha).add_(ctx.k)
            scaled = inverse_power(d, ctx.beta).mul_(grad[rows])  # g d^-beta
            sums = ctx.backward_sums(scaled.mul(a).div_(d))  # W(g b / d), b = a d^-beta
            torch.addcmul(scaled, a, sums, value=-2.0 * ctx.alpha * ctx.beta, out=grad_x[rows])
        return grad_x, None, None, None, None, None


def response_norm(x: torch.Tensor, sums, backward_sums, k: float, alpha: float, beta: float) -> torch.Tensor:
    """`ResponseNormalisation` when run eagerly. A compiled region gets the formula itself, which Inductor fuses and
    differentiates: faster there than tracing the Function and than leaving it out of the region (measured).
    Under autocast the layer is computed in float32 (the "float32 island": a sum of squares and its power lose too
    much in bf16 or fp16) and returned in x's type."""
    if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return response_norm(x.float(), sums, backward_sums, k, alpha, beta).to(x.dtype)
    if torch.compiler.is_compiling():
        return x / (k + alpha * sums(x * x)).pow(beta)
    return ResponseNormalisation.apply(x, sums, backward_sums, k, alpha, beta)


def inverse_power(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d^-beta. Both normalisations have beta = 3/4, d^-1/2 * d^-1/4: square roots cost a fraction of a pow."""
    if beta == 0.75:
        return d.rsqrt().mul_(d.sqrt().rsqrt_())
    return d.pow(-beta)


class LocalResponseNorm(nn.Module):
    """§3.3 across-channel response normalisation, b_i = a_i / (k + alpha * sum_j a_j^2)^beta, the sum over the
    n=5 maps centred on i, clipped at the first and last map. Each tower owns its layer, so a window never crosses
    towers.

    `alpha_over_n`: the paper's formula taken literally is k + alpha * sum (PyTorch's LocalResponseNorm with
    alpha=5e-4); the 2012 code divides alpha by n, k + (alpha / n) * sum (PyTorch's alpha=1e-4). The window sums
    are a 1x1 convolution with a fixed 0/1 band matrix: the same numbers as torch's layer, several times faster
    than its avg_pool3d on CPUs. `ResponseNormalisation` computes the layer and its gradient, whose window sums
    are shifted additions (`band_sums`).
    """

    def __init__(self, channels: int, alpha_over_n: bool):
        super().__init__()
        self.alpha = LRN_ALPHA / LRN_SIZE if alpha_over_n else LRN_ALPHA
        offsets = torch.arange(channels)
        band = (offsets[:, None] - offsets[None, :]).abs() <= LRN_SIZE // 2
        self.register_buffer("band", band.float()[:, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """`groups` > 1: x holds that many towers' maps side by side (the grouped network); each is normalised
        on its own, with the same sums as in its tower."""
        band = self.band.repeat(groups, 1, 1, 1) if groups > 1 else self.band
        return response_norm(x, lambda t: F.conv2d(t, band.to(t.dtype), groups=groups),
                             lambda t: band_sums(t, groups), LRN_K, self.alpha, LRN_BETA)

    def extra_repr(self) -> str:
        return f"channels={self.band.shape[0]}, size={LRN_SIZE}, alpha={self.alpha} on the sum, beta={LRN_BETA}, k={LRN_K}"


def band_sums(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Each map's sum with its LRN_SIZE // 2 neighbours on either side within its group: the band convolution's
    sums as shifted additions (no multiplications by the band's zeros)."""
    n, c, h, w = x.shape
    maps = x.view(n, groups, c // groups, h, w)
    sums = maps.clone()
    for shift in range(1, LRN_SIZE // 2 + 1):
        sums[:, :, shift:] += maps[:, :, :-shift]
        sums[:, :, :-shift] += maps[:, :, shift:]
    return sums.view(n, c, h, w)


class SpatialResponseNorm(nn.Module):
    """The 2012 code's `cnorm2`: each map divided by (1 + scale/size^2 * its 5x5 neighbourhood's sum of squares)^pow.

    Zeros stand in beyond the border and the divisor is always size^2 (cuda-convnet's rnorm): a box mean with
    count_include_pad, symmetric like the LRN's band, so `ResponseNormalisation` computes it too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return response_norm(x, spatial_mean, spatial_mean, 1.0, SPATIAL_NORM_SCALE, SPATIAL_NORM_POW)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, SPATIAL_NORM_SIZE, stride=1, padding=SPATIAL_NORM_SIZE // 2, count_include_pad=True)


class MaxPoolPositions(torch.autograd.Function):
    """torch's max pooling (its maxima and the positions they come from, by torch's own kernels), keeping only the
    positions for the backward pass, not the input: the gradient goes to the positions and needs nothing else.
    On CPUs the maps are pooled in channels-last layout, where torch's kernel is vectorised over the channels (for
    the 55x55 and 27x27 maps here several times faster than its per-map kernel, measured); the result comes back
    in the input's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, stride: int, ceil_mode: bool) -> torch.Tensor:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        pooled = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
        out, positions = torch.ops.aten.max_pool2d_with_indices(pooled, size, stride, 0, 1, ceil_mode)
        ctx.save_for_backward(positions.contiguous(memory_format=layout))
        ctx.shape, ctx.layout, ctx.size, ctx.stride, ctx.ceil_mode = x.shape, layout, size, stride, ceil_mode
        return out.contiguous(memory_format=layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        positions, = ctx.saved_tensors
        # the input's shape and layout are all the kernel reads of it
        like_input = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(memory_format=ctx.layout), like_input, ctx.size, ctx.stride, 0, 1, ctx.ceil_mode,
            positions)
        return grad_input, None, None, None


class MaxPool(nn.Module):
    """§3.4 max pooling over size x size windows at `stride` (`MaxPoolPositions`)."""

    def __init__(self, size: int, stride: int, ceil_mode: bool = False):
        super().__init__()
        self.size, self.stride, self.ceil_mode = size, stride, ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # Inductor has its own pooling code (faster there, measured)
            return F.max_pool2d(x, self.size, self.stride, ceil_mode=self.ceil_mode)
        return MaxPoolPositions.apply(x, self.size, self.stride, self.ceil_mode)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, ceil_mode={self.ceil_mode}"


class Dropout(nn.Module):
    """§4.2 dropout with p=0.5. `paper`: zero each unit with probability p while training and multiply every
    output by 1-p at test ("a reasonable approximation to taking the geometric mean"). `inverted`: PyTorch's,
    scaling by 1/(1-p) while training and doing nothing at test. Equal in expectation."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "inverted":
            return F.dropout(x, DROPOUT_P, self.training)
        if self.training:
            return x * torch.empty_like(x).bernoulli_(1.0 - DROPOUT_P)
        return x * (1.0 - DROPOUT_P)

    def extra_repr(self) -> str:
        return f"p={DROPOUT_P}, style={self.style}"


def exchange(parts: Sequence[torch.Tensor], devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """Every tower's activations gathered on each of `devices`, tower 0's channels first: one of the four places
    (conv3, fc6, fc7, fc8) where the towers talk (§3.2).

    Every copy is queued before anything else. A copy between two GPUs runs on the source GPU's current stream and
    waits for all the work queued on both GPUs' current streams before it (ATen's `copy_device_to_device`, "a
    two-way barrier"): queued after one tower's next layers (or even after a concatenation), it would hold the
    other tower back until they were done, and the towers would take turns."""
    gathered = [[part.to(device) for part in parts] for device in devices]
    return [torch.cat(group, dim=1) for group in gathered]


class Tower(nn.Module):
    """One GPU's half of the network (§3.2). conv3, fc6 and fc7 take the inputs of all towers (`num_towers`)."""

    def __init__(self, widths: Sequence[int], num_towers: int, options: Mapping):
        super().__init__()
        c1, c2, c3, c4, c5, f6, f7 = widths
        overlap = options["overlap_pool"]
        # §3.1 / Figure 2. conv1 sees the whole image. With non-overlapping 2x2 pooling the 2012 code kept the
        # maps near 27/13/6 by giving conv2 padding 1 and conv5 padding 0 (run #147; maps 28, 13, 6).
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=2 if options["conv1_padding"] == "symmetric2" else 0)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2 if overlap else 1)
        self.conv3 = nn.Conv2d(c2 * num_towers, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1 if overlap else 0)
        self.fc6 = nn.Linear(c5 * 6 * 6 * num_towers, f6)
        self.fc7 = nn.Linear(f6 * num_towers, f7)
        self.lrn1 = LocalResponseNorm(c1, options["lrn_alpha_over_n"]) if options["lrn"] else nn.Identity()
        self.lrn2 = LocalResponseNorm(c2, options["lrn_alpha_over_n"]) if options["lrn"] else nn.Identity()
        # lrn=False removes every normalisation layer, the extra spatial one included (the 2012 run #148).
        self.spatial_norm = SpatialResponseNorm() if options["lrn"] and options["spatial_norm"] else nn.Identity()
        # §3.4: overlapping pooling z=3, s=2; the ablation z=2, s=2 (cuda-convnet sizes its outputs with ceil).
        self.pool = MaxPool(3, 2) if overlap else MaxPool(2, 2, ceil_mode=True)
        self.dropout6 = Dropout(options["dropout_style"]) if options["dropout"] else nn.Identity()
        self.dropout7 = Dropout(options["dropout_style"]) if options["dropout"] else nn.Identity()
        self.lrn1_before_relu = options["lrn_position"] == "before_relu"
        self.right_bottom_pad = options["conv1_padding"] == "right_bottom3"

    def conv1_input(self, images: torch.Tensor) -> torch.Tensor:
        """What conv1 reads: the images, with `right_bottom3` 3 pixels of zeros on the right and bottom (cuda-convnet
        fed 224x224 images to a stride-4 11x11 convolution and sized its output with ceil: 55x55, the last window
        hanging over those edges)."""
        return F.pad(images, (0, 3, 0, 3)) if self.right_bottom_pad else images

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> (ReLU, LRN) -> pool -> conv2 -> ReLU -> LRN -> pool: the layers before the first exchange, from
        `conv1_input`."""
        x = self.conv1(x)
        # ReLUs in place: no backward here needs what they overwrite (convolutions and the LRN keep their inputs)
        x = F.relu(self.lrn1(x), inplace=True) if self.lrn1_before_relu else self.lrn1(F.relu(x, inplace=True))
        x = self.pool(x)
        x = self.lrn2(F.relu(self.conv2(x), inplace=True))
        return self.pool(self.spatial_norm(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """conv3 (input: all towers' pool2) -> conv4 -> conv5 -> pool, flattened channel-major."""
        x = F.relu(self.conv3(x), inplace=True)
        x = F.relu(self.conv4(x), inplace=True)
        x = self.pool(F.relu(self.conv5(x), inplace=True))
        return torch.flatten(x, 1)

    def head6(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout6(F.relu(self.fc6(x), inplace=True))

    def head7(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout7(F.relu(self.fc7(x), inplace=True))


class AlexNet(nn.Module):
    """The 2012 network. Tower t lives on `devices[t]`; the input may be on any device; logits come back on
    `devices[0]`. `towers=1` is §3.2's one-GPU comparison net, on `devices[0]`.

    `preset` picks the fidelity preset (`paper` or `cuda_convnet`); keyword overrides change single options,
    e.g. `AlexNet(lrn=False)` for the §3.3 ablation. `width` is not the paper's: every layer's width times it (at
    least 1 unit), a narrower network of the same structure for tests and smoke runs.
    """

    def __init__(self, num_classes: int = 1000, devices: Sequence = ("cpu", "cpu"), preset: str = "paper",
                 width: float = 1.0, **overrides):
        super().__init__()
        self.options = resolve_options(preset, **overrides)
        self.preset = preset
        if len(devices) != 2:
            raise ValueError(f"devices must name two devices (one per tower), got {list(devices)}")
        if not width > 0:
            raise ValueError(f"width={width}: must be positive (1 is the paper's network)")
        num_towers = self.options["towers"]
        self.devices = [torch.device(d) for d in devices][:num_towers]
        # §5's weights come from the CPU generator as it was before any layer existed, and it goes on from where
        # those draws end: the layers' default initialisation (overwritten by `reset_parameters`) draws from the
        # generator of the device each layer is built on, the CPU's in a CPU build and a GPU's in a GPU build, so
        # otherwise one seed would give other weights, and another generator state after them, on GPUs.
        init_generator = torch.Generator().set_state(torch.get_rng_state())
        widths = [max(1, round(w * width)) for w in (TWO_TOWER_WIDTHS if num_towers == 2 else ONE_TOWER_WIDTHS)]
        self.towers = nn.ModuleList()
        for device in self.devices:
            with torch.device(device):  # built where it runs, never moved (works under FakeTensorMode too)
                self.towers.append(Tower(widths, num_towers, self.options))
        with torch.device(self.devices[0]):
            self.fc8 = nn.Linear(widths[6] * num_towers, num_classes)  # §3.5: one 1000-way layer, on GPU 0
        # Both towers as one grouped network when they share a device (repro.speed sets it; `forward_grouped`).
        self.grouped = False
        self.reset_parameters(init_generator)
        torch.set_rng_state(init_generator.get_state())

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """§5: every weight ~ N(0, 0.01); biases of conv2, conv4, conv5, fc6 and fc7 = 1 (to give the ReLUs
        positive inputs early on), the rest 0. The 2012 code drew conv3-conv5 with std 0.03.

        The values come from `generator` (default: the CPU generator), always on the CPU, and are copied to each
        tower's device: every GPU's generator starts from the same seed, so drawing on two GPUs would give both
        towers the same weights, and CPU and GPU generators differ, so a seed gives the same network on any
        devices."""

        def normal(param: torch.Tensor, std: float) -> None:
            param.copy_(torch.randn(param.shape, generator=generator, device="cpu") * std)

        deep_std = 0.03 if self.options["init"] == "cuda_convnet" else 0.01
        for tower in self.towers:
            for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
                layer = getattr(tower, name)
                normal(layer.weight, deep_std if name in ("conv3", "conv4", "conv5") else 0.01)
                layer.bias.fill_(self.options["init_bias"] if name in ("conv2", "conv4", "conv5", "fc6", "fc7")
                                 else 0.0)
        normal(self.fc8.weight, 0.01)
        self.fc8.bias.zero_()

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """`x`: the images, or one copy per tower already on its device (`repro.data.Augment` builds each tower's
        input where it runs, so the float batch never crosses devices)."""
        inputs = list(x) if isinstance(x, (list, tuple)) else [x] * len(self.towers)
        if len(inputs) != len(self.towers):
            raise ValueError(f"got {len(inputs)} inputs for {len(self.towers)} tower(s)")
        if self.grouped:
            return self.forward_grouped(inputs[0])
        images = [image.to(device) for image, device in zip(inputs, self.devices)]
        # Each stage tower by tower, each exchange's copies all queued before the next stage (`exchange`): on two
        # GPUs the launches are asynchronous, so the towers should compute at once and meet at each exchange (the
        # call order is tested under fake tensors; the overlap is measured by make preflight's speed-overlap on GPUs).
        pool2 = [tower.stem(x) for tower, x in zip(self.towers, self.conv1_inputs(images))]
        pool5 = [tower.trunk(x) for tower, x in zip(self.towers, exchange(pool2, self.devices))]
        fc6 = [tower.head6(x) for tower, x in zip(self.towers, exchange(pool5, self.devices))]
        fc7 = [tower.head7(x) for tower, x in zip(self.towers, exchange(fc6, self.devices))]
        return self.fc8(exchange(fc7, self.devices[:1])[0])

    def conv1_inputs(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tower's conv1 input (`Tower.conv1_input`) from its images, made once per input tensor: towers on one
        device share it, and the copy conv1 keeps for its backward pass."""
        made = {}
        for tower, image in zip(self.towers, images):
            if id(image) not in made:
                made[id(image)] = tower.conv1_input(image)
        return [made[id(image)] for image in images]

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as `forward`, for two towers on one device: conv1..pool5 run once for both towers
        (`GroupedTowers`), so conv1 and conv3 read their shared input once and each exchange is a no-op. fc6 and
        fc7 stay per tower, so dropout draws exactly the tower path's masks, in the same order."""
        if len(self.towers) != 2 or self.devices[0] != self.devices[1]:
            raise ValueError(f"the grouped forward needs two towers on one device, not {self.devices}")
        both = GroupedTowers(self.towers)
        pool5 = Tower.trunk(both, Tower.stem(both, Tower.conv1_input(both, x.to(self.devices[0]))))
        fc6 = torch.cat([tower.head6(pool5) for tower in self.towers], dim=1)
        fc7 = torch.cat([tower.head7(fc6) for tower in self.towers], dim=1)
        return self.fc8(fc7)


class GroupedTowers:
    """Two towers' conv layers as one grouped network, run by `Tower.stem` and `Tower.trunk` themselves: conv1
    and conv3 with the towers' kernels stacked (both towers read the same input), conv2, conv4 and conv5 with
    groups=2 and each LRN within its tower. The weights are stacked anew at every call (2.3M values), so the
    towers keep owning the parameters: gradients, optimiser state and checkpoints are those of the tower path."""

    def __init__(self, towers: Sequence[Tower]):
        first = towers[0]
        self.right_bottom_pad, self.lrn1_before_relu = first.right_bottom_pad, first.lrn1_before_relu
        self.pool, self.spatial_norm = first.pool, first.spatial_norm  # the same on every channel
        self.conv1, self.conv3 = self.joined(towers, "conv1", 1), self.joined(towers, "conv3", 1)
        self.conv2, self.conv4 = self.joined(towers, "conv2", 2), self.joined(towers, "conv4", 2)
        self.conv5 = self.joined(towers, "conv5", 2)
        self.lrn1, self.lrn2 = (
            (lambda x, lrn=lrn: lrn(x, groups=2)) if isinstance(lrn, LocalResponseNorm) else lrn
            for lrn in (first.lrn1, first.lrn2))

    @staticmethod
    def joined(towers: Sequence[Tower], name: str, groups: int):
        layers = [getattr(tower, name) for tower in towers]
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        first = layers[0]
        return lambda x: F.conv2d(x, weight, bias, first.stride, first.padding, groups=groups)


# The single-device grouped layout (Caffe's bvlc_alexnet, groups=2 in conv2, conv4, conv5): each layer's tower
# halves stacked along the output axis, tower 0 first. conv3, fc6, fc7 and fc8 already read both towers in that
# order, so their input axes need no change.
GROUPED_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


def to_grouped_state_dict(model: AlexNet) -> dict[str, torch.Tensor]:
    """`conv1`..`fc8` weights and biases in the grouped single-device layout, as CPU tensors."""
    sd = {}
    for name in GROUPED_LAYERS:
        for kind in ("weight", "bias"):
            sd[f"{name}.{kind}"] = torch.cat(
                [getattr(getattr(t, name), kind).detach().cpu() for t in model.towers], dim=0)
    sd["fc8.weight"] = model.fc8.weight.detach().cpu().clone()
    sd["fc8.bias"] = model.fc8.bias.detach().cpu().clone()
    return sd


@torch.no_grad()
def load_grouped_state_dict(model: AlexNet, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy a grouped-layout state dict into the towers, each half onto its tower's device."""
    expected = {f"{name}.{kind}" for name in (*GROUPED_LAYERS, "fc8") for kind in ("weight", "bias")}
    if set(sd) != expected:
        raise ValueError(f"grouped state dict keys differ: missing {sorted(expected - set(sd))}, "
                         f"unexpected {sorted(set(sd) - expected)}")
    targets = {f"{name}.{kind}": [getattr(getattr(t, name), kind) for t in model.towers]
               for name in GROUPED_LAYERS for kind in ("weight", "bias")}
    targets["fc8.weight"], targets["fc8.bias"] = [model.fc8.weight], [model.fc8.bias]
    for key, params in targets.items():
        want = (sum(p.shape[0] for p in params), *params[0].shape[1:])
        if tuple(sd[key].shape) != want:
            raise ValueError(f"grouped state dict: {key} has shape {list(sd[key].shape)}, expected {list(want)}")
        for param, part in zip(params, torch.split(sd[key], params[0].shape[0], dim=0)):
            param.copy_(part)
