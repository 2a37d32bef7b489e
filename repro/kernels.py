"""conv1's kernels (the paper's Figure 3), logged by training every epoch and drawn by `repro.reports.figures`: each
tower's kernels as a picture, and a number saying how colour-specific they are (§6.1: one GPU's kernels largely
colour-agnostic, the other's colour-specific)."""

from __future__ import annotations

import torch

from repro.model import AlexNet


def conv1_grids(model: AlexNet, per_row: int = 8, zoom: int = 1, padding: int = 1) -> list[torch.Tensor]:
    """Each tower's conv1 kernels as one RGB image [3, H, W] in [0, 1], `zoom` times enlarged (nearest). The paper
    does not say how it scaled them; here each kernel is stretched on its own from its lowest weight (black) to its
    highest (white) over all three channels, which keeps the balance between its colours."""
    from torchvision.utils import make_grid  # here: importing torchvision takes a second that most commands never need

    grids = []
    for tower in model.towers:
        kernels = tower.conv1.weight.detach().float().cpu()
        kernels = kernels.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
        grids.append(make_grid(kernels, nrow=per_row, padding=padding, normalize=True, scale_each=True,
                               pad_value=1.0))
    return grids


def colour_specificity(kernels: torch.Tensor) -> float:
    """How colour-specific RGB kernels [K, 3, h, w] are, from 0 to 1.

    Per kernel: the fraction of its energy (sum of squared weights) that is not in its grey part, the grey part
    being each pixel's mean over R, G and B; then the mean over the kernels. 0: every kernel weighs R, G and B
    alike (colour-agnostic); 1: at every pixel the weights sum to zero over R, G and B (pure colour opponency).
    A kernel with independent random weights per channel scores 2/3 on average (colour is two of the three
    dimensions of RGB), so a freshly initialised tower sits near 0.67: training moves a colour-agnostic tower
    down from there and a colour-specific one stays or goes up.
    """
    weights = kernels.detach().double().flatten(2)  # [K, 3, h*w]
    chroma = weights - weights.mean(dim=1, keepdim=True)
    energy = weights.pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    return float((chroma.pow(2).sum(dim=(1, 2)) / energy).mean())


def conv1_colour(model: AlexNet) -> list[float]:
    """`colour_specificity` of each tower's conv1 kernels."""
    return [colour_specificity(tower.conv1.weight) for tower in model.towers]
