"""The paper's update rule (§5) and its learning-rate schedules.

§5: v <- 0.9 v - 0.0005 lr w - lr grad;  w <- w + v. The learning rate sits inside the velocity, so a drop of the
rate leaves the momentum history alone (torch.optim.SGD keeps lr outside its buffer and so rescales the whole
history at once when the rate drops). The 2012 code (`Weights::update`) does exactly this, with no weight decay on
biases.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class PaperSGD(Optimizer):
    """§5's momentum SGD with weight decay, the rate inside the velocity. Each parameter group may set its own
    `lr`, `weight_decay` and `momentum` (used for the biases' decay and conv1's late rate changes).

    Under fp16 autocast `torch.amp.GradScaler.step` hands the step the loss scale and its inf/NaN flag as tensors
    (`grad_scale`, `found_inf`; the amp protocol of `_step_supports_amp_scaling`): the step unscales the gradients
    itself and leaves every parameter and velocity as it was when the flag is set, all on the devices, instead of
    the scaler reading the flag on the host (a sync per device per step) to decide whether to call it."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"PaperSGD: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scaled = {}  # per device: (1 / loss scale or None, "no inf/NaN in any gradient"), for the amp protocol
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                if found_inf is None:
                    v.mul_(momentum).add_(p, alpha=-decay * lr).add_(p.grad, alpha=-lr)
                    p.add_(v)
                    continue
                if p.device not in scaled:  # the scaler's own unscaling: grad * float32(1 / float64(scale))
                    inverse = (grad_scale.double().reciprocal().float().to(p.device, non_blocking=True)
                               if grad_scale is not None else None)
                    scaled[p.device] = inverse, found_inf.to(p.device, non_blocking=True) == 0
                inverse, finite = scaled[p.device]
                grad = p.grad * inverse if inverse is not None else p.grad
                # the same operations as above on a copy, kept only where every gradient was finite
                v.copy_(torch.where(finite, v.mul(momentum).add_(p, alpha=-decay * lr).add_(grad, alpha=-lr), v))
                p.add_(v * finite)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """conv1's weights and biases, the other weights, the other biases: the groups the schedules address."""
    groups = {"conv1": [], "weights": [], "biases": []}
    for name, p in model.named_parameters():
        groups["conv1" if ".conv1." in name else "biases" if name.endswith("bias") else "weights"].append(p)
    return [{"name": "conv1", "params": groups["conv1"], "weight_decay": weight_decay},
            {"name": "weights", "params": groups["weights"], "weight_decay": weight_decay},
            {"name": "biases", "params": groups["biases"], "weight_decay": weight_decay if decay_biases else 0.0}]


class Schedule:
    """The learning rate per epoch, and when training ends.

    `plateau` (§5): start at `lr`, divide by 10 when the validation error has not improved for `patience` epochs,
    at most `max_drops` times; the next plateau after the last drop ends training (or `max_epochs`).
    `milestones` (the 2012 run #145): divide by 10 at each epoch in `milestones`, end at `max_epochs`; from epoch
    `conv1_slow_epoch` conv1 learns at `conv1_slow_lr` and the colour noise is off, from `conv1_freeze_epoch`
    conv1 is frozen.
    """

    def __init__(self, kind: str, lr: float, patience: int = 5, max_drops: int = 3, max_epochs: int = 90,
                 milestones: tuple = (25, 51, 79), conv1_slow_epoch: int | None = None,
                 conv1_slow_lr: float = 1e-5, conv1_freeze_epoch: int | None = None):
        if kind not in ("plateau", "milestones"):
            raise ValueError(f"schedule kind must be 'plateau' or 'milestones', got {kind!r}")
        self.kind, self.base_lr, self.patience, self.max_drops = kind, lr, patience, max_drops
        self.max_epochs, self.milestones = max_epochs, tuple(milestones)
        self.conv1_slow_epoch, self.conv1_slow_lr = conv1_slow_epoch, conv1_slow_lr
        self.conv1_freeze_epoch = conv1_freeze_epoch
        self.drops, self.best_error, self.epochs_since_best, self.finished = 0, math.inf, 0, False

    def lr(self, epoch: int) -> float:
        drops = sum(epoch >= m for m in self.milestones) if self.kind == "milestones" else self.drops
        return self.base_lr / 10**drops

    def conv1_lr(self, epoch: int) -> float:
        if self.conv1_freeze_epoch is not None and epoch >= self.conv1_freeze_epoch:
            return 0.0
        if self.conv1_slow_epoch is not None and epoch >= self.conv1_slow_epoch:
            return self.conv1_slow_lr
        return self.lr(epoch)

    def colour_noise(self, epoch: int) -> bool:
        """False once the 2012 run switched colour noise off, with conv1's slow-down."""
        return self.conv1_slow_epoch is None or epoch < self.conv1_slow_epoch

    def apply(self, optimizer: Optimizer, epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.conv1_lr(epoch) if group.get("name") == "conv1" else self.lr(epoch)

    def end_of_epoch(self, epoch: int, val_error: float) -> None:
        """Record epoch `epoch`'s validation error; decide on a drop (plateau) and whether training is over."""
        if val_error < self.best_error:
            self.best_error, self.epochs_since_best = val_error, 0
        else:
            self.epochs_since_best += 1
        if self.kind == "plateau" and self.epochs_since_best >= self.patience:
            if self.drops == self.max_drops:
                self.finished = True
            else:
                self.drops += 1
                self.epochs_since_best = 0
        if epoch + 1 >= self.max_epochs:
            self.finished = True

    def state_dict(self) -> dict:
        return {"drops": self.drops, "best_error": self.best_error, "epochs_since_best": self.epochs_since_best,
                "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.best_error = state["drops"], state["best_error"]
        self.epochs_since_best, self.finished = state["epochs_since_best"], state["finished"]
