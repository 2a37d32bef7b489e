"""An independent single-device implementation of the 2012 network in the grouped layout, for the tests.

Written from the paper's formulas with functional ops (grouped convolutions, per-group LRN as an explicit sum over
the clipped channel window, the spatial norm as a box-filter convolution), sharing no code with repro.model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lrn_by_formula(x: torch.Tensor, groups: int, alpha: float, k: float = 2.0, n: int = 5, beta: float = 0.75):
    """§3.3: b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta within each group."""
    out = []
    for a in x.chunk(groups, dim=1):
        N = a.shape[1]
        sums = [(a[:, max(0, i - n // 2): min(N - 1, i + n // 2) + 1] ** 2).sum(dim=1) for i in range(N)]
        out.append(a / (k + alpha * torch.stack(sums, dim=1)) ** beta)
    return torch.cat(out, dim=1)


def spatial_norm_by_formula(x: torch.Tensor, scale: float = 1e-3, size: int = 5, power: float = 0.75):
    """cuda-convnet rnorm: x / (1 + scale/size^2 * sum of x^2 over the size x size window, zeros outside)^power."""
    channels = x.shape[1]
    box = torch.ones(channels, 1, size, size, dtype=x.dtype)
    sums = F.conv2d(x * x, box, padding=size // 2, groups=channels)
    return x / (1 + scale / size**2 * sums) ** power


def grouped_forward(sd: dict, x: torch.Tensor, options: dict, training: bool = False,
                    masks: tuple | None = None) -> torch.Tensor:
    """Logits of the grouped network with weights `sd`. `masks` = (fc6 keep mask, fc7 keep mask) in training."""
    g = 2 if options["towers"] == 2 else 1
    alpha = 1e-4 / 5 if options["lrn_alpha_over_n"] else 1e-4
    overlap = options["overlap_pool"]

    def pool(t):
        return F.max_pool2d(t, 3, 2) if overlap else F.max_pool2d(t, 2, 2, ceil_mode=True)

    def dropout(t, mask):
        if not options["dropout"]:
            return t
        if options["dropout_style"] == "inverted":
            return t * mask / 0.5 if training else t
        return t * mask if training else t * 0.5

    if options["conv1_padding"] == "right_bottom3":
        x = F.conv2d(F.pad(x, (0, 3, 0, 3)), sd["conv1.weight"], sd["conv1.bias"], stride=4)
    else:
        x = F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=4, padding=2)
    if not options["lrn"]:
        x = F.relu(x)
    elif options["lrn_position"] == "before_relu":
        x = F.relu(lrn_by_formula(x, g, alpha))
    else:
        x = lrn_by_formula(F.relu(x), g, alpha)
    x = pool(x)
    x = F.relu(F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"], padding=2 if overlap else 1, groups=g))
    if options["lrn"]:
        x = lrn_by_formula(x, g, alpha)
        if options["spatial_norm"]:
            x = spatial_norm_by_formula(x)
    x = pool(x)
    x = F.relu(F.conv2d(x, sd["conv3.weight"], sd["conv3.bias"], padding=1))
    x = F.relu(F.conv2d(x, sd["conv4.weight"], sd["conv4.bias"], padding=1, groups=g))
    x = F.relu(F.conv2d(x, sd["conv5.weight"], sd["conv5.bias"], padding=1 if overlap else 0, groups=g))
    x = pool(x).flatten(1)
    mask6, mask7 = masks if masks is not None else (None, None)
    x = dropout(F.relu(F.linear(x, sd["fc6.weight"], sd["fc6.bias"])), mask6)
    x = dropout(F.relu(F.linear(x, sd["fc7.weight"], sd["fc7.bias"])), mask7)
    return F.linear(x, sd["fc8.weight"], sd["fc8.bias"])
