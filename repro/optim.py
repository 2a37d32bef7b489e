"""The paper's update rule (§5) and its learning-rate schedules.

§5: v <- 0.9 v - 0.0005 lr w - lr grad;  w <- w + v. The learning rate sits inside the velocity, so a drop of the
rate leaves the momentum history alone (torch.optim.SGD keeps lr outside its buffer and so rescales the whole
history at once when the rate drops). The 2012 code (`Weights::update`) does exactly this, with no weight decay on
biases and a learning rate of their own (epsB).

Epochs are counted from 0 here, everywhere (configs, logs, checkpoints, metrics). The 2012 notes count from 1 (the
data provider starts at `init_epoch=1`), so their "epoch 25" is epoch 24 here.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from repro.errors import RunError


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


GROUPS = ("conv1_weights", "conv1_biases", "weights", "biases")
THREE_GROUPS = ["conv1", "weights", "biases"]  # the layout of checkpoints written before conv1's biases had a group


def group_of(parameter: str) -> str:
    """The group (one of GROUPS) of the model's parameter named `parameter`."""
    kind = "biases" if parameter.endswith("bias") else "weights"
    return f"conv1_{kind}" if ".conv1." in parameter else kind


def param_groups(model: torch.nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """conv1's weights, conv1's biases, the other weights, the other biases: the groups the schedules address
    (conv1 slows down and freezes late in the 2012 run; biases may learn at a rate of their own)."""
    groups = {name: [] for name in GROUPS}
    for name, p in model.named_parameters():
        groups[group_of(name)].append(p)
    bias_decay = weight_decay if decay_biases else 0.0  # the 2012 code builds every bias with wc=0
    return [{"name": name, "params": params, "weight_decay": bias_decay if name.endswith("biases") else weight_decay}
            for name, params in groups.items()]


def load_state(optimizer: Optimizer, state: dict, model: torch.nn.Module) -> None:
    """Load a checkpoint's optimizer state into `optimizer` (built by `param_groups` for `model`): the velocities
    are the checkpoint's, the group settings (decay, momentum) this run's; the schedule sets the rates. A state of
    the older three-group layout (conv1, weights, biases) has each velocity moved to its parameter's new group."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if [g.get("name") for g in state["param_groups"]] == THREE_GROUPS:
        state = regroup(state, [name for name, _ in model.named_parameters()], settings)
    if layout(state["param_groups"]) != layout(optimizer.param_groups):
        raise RunError(f"the checkpoint's optimizer state has the groups (name, size) {layout(state['param_groups'])}, "
                       f"this run {layout(optimizer.param_groups)}: resume with the settings it was written with, or "
                       "start a new run in another folder")
    optimizer.load_state_dict(state)
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)


def regroup(state: dict, names: list[str], settings: list[dict]) -> dict:
    """A three-group optimizer state in the layout of GROUPS with `settings`, for a model whose parameters are
    `names` (in model order). Returned as it is when its group sizes are another model's."""
    old_group = {n: group_of(n).split("_")[0] for n in names}  # conv1's weights and biases were one group, "conv1"
    if [len(g["params"]) for g in state["param_groups"]] != [list(old_group.values()).count(g) for g in THREE_GROUPS]:
        return state
    old = [n for g in THREE_GROUPS for n in names if old_group[n] == g]  # a state's indices follow its groups
    new = [n for g in GROUPS for n in names if group_of(n) == g]
    velocities = state["state"]
    return {"state": {new.index(n): velocities[i] for i, n in enumerate(old) if i in velocities},
            "param_groups": [dict(s, params=[i for i, n in enumerate(new) if group_of(n) == s["name"]])
                             for s in settings]}


def layout(groups: list[dict]) -> list[tuple]:
    """Each parameter group's name and size."""
    return [(g.get("name"), len(g["params"])) for g in groups]


SCHEDULE_KINDS = ("plateau", "milestones")


class Schedule:
    """The learning rates per epoch and parameter group, and when training ends. Epochs are counted from 0.

    `plateau` (§5): start at `lr`, divide by 10 when the validation error has not improved for `patience` epochs,
    at most `max_drops` times; the next plateau after the last drop ends training (or `max_epochs`).
    `milestones` (the 2012 run #145): divide by 10 from each epoch in `milestones` on, end after `max_epochs`
    epochs; from epoch `conv1_slow_epoch` conv1's weights learn at `conv1_slow_lr` and the colour noise is off, from
    `conv1_freeze_epoch` conv1 is frozen (weights and biases).
    `bias_lr`: None, the biases learn at their layer's weights' rate (the paper); a number, the biases learn at that
    fixed rate, which the drops and conv1's slow-down do not change (run #145's epsB=0.02: its notes log every
    change, all of them epsW changes, and its final layer-params-145.cfg still has epsB=0.02 on every layer but
    conv1, whose 0 is conv1's freeze).
    """

    def __init__(self, kind: str, lr: float, patience: int = 5, max_drops: int = 3, max_epochs: int = 90,
                 milestones: tuple = (24, 50, 78), conv1_slow_epoch: int | None = None,
                 conv1_slow_lr: float = 1e-5, conv1_freeze_epoch: int | None = None, bias_lr: float | None = None):
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {list(SCHEDULE_KINDS)}, got {kind!r}")
        self.kind, self.base_lr, self.patience, self.max_drops = kind, lr, patience, max_drops
        self.max_epochs, self.milestones = max_epochs, tuple(milestones)
        self.conv1_slow_epoch, self.conv1_slow_lr = conv1_slow_epoch, conv1_slow_lr
        self.conv1_freeze_epoch, self.bias_lr = conv1_freeze_epoch, bias_lr
        self.drops, self.best_error, self.epochs_since_best, self.finished = 0, math.inf, 0, False

    def lr(self, epoch: int) -> float:
        """The weights' rate (conv1's too, until its slow-down)."""
        drops = sum(epoch >= m for m in self.milestones) if self.kind == "milestones" else self.drops
        return self.base_lr / 10**drops

    def group_lr(self, group: str, epoch: int) -> float:
        """The rate of the parameter group named `group` (see `GROUPS`) in epoch `epoch`."""
        conv1, biases = group.startswith("conv1"), group.endswith("biases")
        if conv1 and self.conv1_freeze_epoch is not None and epoch >= self.conv1_freeze_epoch:
            return 0.0
        if biases and self.bias_lr is not None:
            return self.bias_lr
        if conv1 and self.conv1_slow_epoch is not None and epoch >= self.conv1_slow_epoch:
            return self.conv1_slow_lr
        return self.lr(epoch)

    def rates(self, epoch: int) -> dict:
        """The rates to log: `lr`, and `bias_lr` when the biases have a rate of their own."""
        return {"lr": self.lr(epoch)} | ({} if self.bias_lr is None else {"bias_lr": self.bias_lr})

    def describe(self, epoch: int) -> str:
        """Epoch `epoch` and every group's rate, for the log."""
        rates = ", ".join(f"{group} {self.group_lr(group, epoch):g}" for group in GROUPS)
        return f"epoch {epoch} (counted from 0; the 2012 notes count from 1: their epoch {epoch + 1}): lr {rates}"

    def colour_noise(self, epoch: int) -> bool:
        """False once the 2012 run switched colour noise off, with conv1's slow-down."""
        return self.conv1_slow_epoch is None or epoch < self.conv1_slow_epoch

    def apply(self, optimizer: Optimizer, epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.group_lr(group.get("name", "weights"), epoch)

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
