"""Measuring the network where it runs, shared by `make bench` (tools/bench.py) and `make preflight`
(repro/preflight.py): a training step, a timer and a peak-memory probe that cover every device of the model, the FLOP
count, the exchange copies of one step, and dispatch modes that record cross-device copies and host syncs.

CUDA work is asynchronous and each GPU has its own queue: `torch.cuda.synchronize(d)` waits for device d only, and
`torch.cuda.reset_peak_memory_stats()` without a device resets the current device only. A step of the two-tower
network ends with tower 1's backward and updates still queued on the second GPU, so every measurement here waits for,
resets and reads each device of the model.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from repro import speed
from repro.config import SpeedConfig
from repro.model import AlexNet, Tower
from repro.optim import PaperSGD, param_groups

IMAGENET_TRAIN, EPOCHS = 1_281_167, 90  # ILSVRC-2012 training images; the paper's ~90 epochs (§5)


def distinct(devices: Iterable) -> list[torch.device]:
    """Each device of `devices` once, in order."""
    return list(dict.fromkeys(torch.device(d) for d in devices))


def devices_of(model: torch.nn.Module) -> list[torch.device]:
    """Every device holding a parameter of `model` (the two-tower network: its towers' devices)."""
    return distinct(p.device for p in model.parameters())


def sync(devices: Iterable) -> None:
    """Wait until every CUDA device among `devices` has finished its queued work (a no-op for the CPU)."""
    for device in distinct(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def seconds_per_call(work: Callable[[], object], devices: Iterable, calls: int) -> float:
    """Wall time of `work()` averaged over `calls` calls, from idle devices to idle devices (all of `devices`)."""
    devices = distinct(devices)
    sync(devices)
    start = time.perf_counter()
    for _ in range(calls):
        work()
    sync(devices)
    return (time.perf_counter() - start) / calls


def median_ms(work: Callable[[], object], devices: Iterable, calls: int, repeats: int) -> float:
    """Milliseconds per `work()` call: the median of `repeats` timings of `calls` calls each, after one warm-up call
    (cuDNN's autotuning, the allocator)."""
    work()
    return 1e3 * statistics.median(seconds_per_call(work, devices, calls) for _ in range(repeats))


def per_tower(images: torch.Tensor, devices: Sequence) -> list[torch.Tensor]:
    """`images` sent once to each distinct device, one entry per tower (as `Augment` builds them)."""
    sent = {device: images.to(device) for device in distinct(devices)}
    return [sent[torch.device(device)] for device in devices]


def gpu_peak_memory(work: Callable[[], object], devices: Iterable) -> dict[str, int]:
    """The most memory torch allocated on each GPU among `devices` while `work()` ran, {"cuda:i": bytes}; empty
    without GPUs. The peak is reset on every one of those devices first."""
    gpus = [d for d in distinct(devices) if d.type == "cuda"]
    sync(gpus)
    for device in gpus:
        torch.cuda.reset_peak_memory_stats(device)
    work()
    sync(gpus)
    return {str(device): torch.cuda.max_memory_allocated(device) for device in gpus}


def build(options: SpeedConfig | None, devices: Sequence = ("cpu", "cpu"), seed: int = 0) -> torch.nn.Module:
    """The two-tower network on `devices` with the speed `options` applied, or with `options` None torchvision's
    `alexnet` on `devices[0]`; the weights drawn from `seed`."""
    torch.manual_seed(seed)
    if options is None:
        import torchvision  # here: a second to import, which the two-tower measurements never need

        return torchvision.models.alexnet(weights=None).to(devices[0])
    return speed.apply(AlexNet(devices=devices), options)


class TrainingStep:
    """One network's training step on a fixed random batch: forward, mean cross-entropy, backward and a `PaperSGD`
    update through amp's loss scaler (a pass-through unless fp16). The images are sent once to each device that runs
    a tower, as `Augment` builds them, so no step copies the float batch between devices. `seconds` waits for every
    device of the model."""

    def __init__(self, model: torch.nn.Module, options: SpeedConfig | None, batch: int, seed: int = 0):
        self.model = model.train()
        self.devices = devices_of(model)
        self.optimizer = PaperSGD(param_groups(model, 5e-4, True), lr=1e-4)  # small: many steps stay finite
        self.scaler = speed.grad_scaler(options or SpeedConfig(), self.devices[0])
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, 224, 224, generator=generator) * 60  # the scale of raw pixels minus the mean
        self.labels = torch.randint(0, 1000, (batch,), generator=generator).to(self.devices[0])
        if isinstance(model, AlexNet):
            self.inputs = per_tower(images, model.devices)
        else:
            self.inputs = images.to(self.devices[0])

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.inputs), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def seconds(self, steps: int) -> float:
        """Seconds per step over `steps` steps, every device of the model finished at both ends."""
        return seconds_per_call(self.step, self.devices, steps)


def training_flops_per_image(options: SpeedConfig | None, lrn: bool = False) -> float:
    """Forward + backward FLOPs of one image, counted by FlopCounterMode at batch 2 on the `meta` device (shapes
    only, no arithmetic): convolutions and matrix products. The two-tower count leaves out the LRN's window sums (a
    1x1 convolution here, not a layer of the model) unless `lrn`, so that both networks are credited with their
    layers' FLOPs only. It is counted on the tower path: torch 2.14's counter credits a groups=2 convolution's
    backward with twice its FLOPs."""
    model = build(options, ("meta", "meta")) if options is None else AlexNet(devices=("meta", "meta"), lrn=lrn)
    x = torch.empty(2, 3, 224, 224, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


# What one tower's activations look like where they cross to the other device (§3.2, the paper's geometry): pool2
# before conv3, pool5 (flattened) before fc6, fc6's and fc7's outputs before fc7 and fc8.
EXCHANGED = {"pool2": (128, 13, 13), "pool5": (4608,), "fc6": (2048,), "fc7": (2048,)}


def exchange_rounds(batch: int, devices: Sequence) -> list[list[tuple[str, str, tuple]]]:
    """The cross-device copies (source, destination, shape) of one forward pass of the paper's two-tower network on
    two devices, each tower's input already on its device, exchange by exchange: pool2, pool5 and fc6 both ways, and
    tower 1's fc7 to fc8 on the first device. The backward pass sends each one's gradient back (`mirrored`)."""
    first, second = (str(torch.device(d)) for d in devices)
    both_ways = [[(src, dst, (batch, *EXCHANGED[name])) for src, dst in ((second, first), (first, second))]
                 for name in ("pool2", "pool5", "fc6")]
    return both_ways + [[(second, first, (batch, *EXCHANGED["fc7"]))]]


def exchange_copies(batch: int, devices: Sequence) -> list[tuple[str, str, tuple]]:
    """Every copy of `exchange_rounds`, in one list."""
    return [copy for exchange in exchange_rounds(batch, devices) for copy in exchange]


def mirrored(copies: list[tuple[str, str, tuple]]) -> list[tuple[str, str, tuple]]:
    """The copies of the gradients that the backward pass sends back for `copies`."""
    return [(dst, src, shape) for src, dst, shape in copies]


def copy_work(copies: list[tuple[str, str, tuple]]) -> Callable[[], list]:
    """A function making `copies` (float32 tensors of those shapes), for timing the exchange alone."""
    parts = [(torch.randn(shape, device=src), dst) for src, dst, shape in copies]
    return lambda: [part.to(dst) for part, dst in parts]


def forward_backward(model: AlexNet, inputs, labels: torch.Tensor) -> Callable[[], None]:
    """A function running the forward and backward pass of a training step (no update)."""

    def work() -> None:
        F.cross_entropy(model(inputs), labels).backward()

    return work


def tower_alone(tower: Tower, x: torch.Tensor) -> Callable[[], None]:
    """A function running one tower's forward and backward pass on its own device, its own activations standing in
    for the other tower's at each exchange (the same shapes): the tower's share of a step without the other tower
    and without copies."""

    def work() -> None:
        pool2 = tower.stem(tower.conv1_input(x))
        pool5 = tower.trunk(torch.cat([pool2, pool2], 1))
        fc6 = tower.head6(torch.cat([pool5, pool5], 1))
        tower.head7(torch.cat([fc6, fc6], 1)).sum().backward()

    return work


class CrossDeviceCopies(TorchDispatchMode):
    """Records (source device, destination device, shape) for every copy that changes device, in `copies`, and in
    `rounds` the same copies grouped as they were dispatched: a round is copies one after another, any other op
    between two copies starts a new round. On GPUs that order matters: a copy between two GPUs waits for all the
    work queued before it on both (`repro.model.exchange`), so an op between two copies of one exchange holds the
    second copy back until it is done."""

    def __init__(self):
        super().__init__()
        self.copies, self.rounds = [], []
        self.copying = False  # the last op dispatched was a copy between devices

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
        elif func is torch.ops.aten.copy_.default:
            src, dst = args[1], args[0]
        else:
            src = dst = None
        if src is None or src.device == dst.device:
            self.copying = self.copying and func.namespace == "prim"  # prim.device and the like: metadata, no work
            return out
        copy = (str(src.device), str(dst.device), tuple(src.shape))
        if not self.copying:
            self.rounds.append([])
        self.rounds[-1].append(copy)
        self.copies.append(copy)
        self.copying = True
        return out


class HostSyncs(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (`.item()`, `int(t)`, `bool(t)`, ...): on a GPU each one
    waits for the GPU to finish all the work queued before it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
