"""`repro-preflight` / `make preflight`: the first command on a new box, before hours of training.

It checks, on the devices the paper's run will use, what could silently spoil that run, and prints one line per
check (`PASS|FAIL|SKIP name: numbers`), then writes everything to preflight.json and exits non-zero naming the
first failure:

- inventory: torch, CUDA, cuDNN and NCCL versions, each GPU's name, memory, compute capability and native bf16,
  peer access between the pair, the float32 precision in force; fails below the torch floor, or when the torch
  build has no kernels for a GPU.
- network: the address gloo listens on (this host's name's), which must not be a loopback address across boxes.
- numerics: the two-tower network's tower path on the GPUs (two, or both towers on one) against the same weights
  (drawn from the same seed) and input on the CPU in IEEE float32 (logits, loss, every parameter's gradient);
  `speed.grouped` on one GPU the same way; bf16 and fp16 autocast against float32, as the cosine similarity of
  each layer's gradient.
- placement: each tower's input built on its own device through the real prefetch and augmentation; the exact
  cross-device copies of one forward and backward pass, each exchange's copies queued together.
- randomness: the towers' dropout masks differ and repeat for the same step seed; k deterministic steps, a
  checkpoint, a resume in a new process and m more steps equal k+m uninterrupted steps bit for bit (the real
  training code).
- speed: a training step (float32, then each speed option), host syncs in a step, how much the towers overlap, the
  exchange copies' time, peak memory per GPU, a prepared store's read rate, and the projected epoch and 90 epochs.

Without GPUs it runs every check that means something on `devices=[cpu,cpu]` and skips the others, saying so.
The timing, memory and copy measurements are those of `make bench` (repro/measure.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import ipaddress
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from repro import speed
from repro.checkpoint import load_checkpoint
from repro.config import SpeedConfig, composed
from repro.data import Augment, batches, step_rng
from repro.demo_data import make_demo_data
from repro.distributed import TIMEOUT, World
from repro.errors import RunError
from repro.loop import seed_dropout
from repro.measure import (EPOCHS, IMAGENET_TRAIN, CrossDeviceCopies, HostSyncs, TrainingStep, build, copy_work,
                           distinct, exchange_copies, exchange_rounds, forward_backward, gpu_peak_memory, median_ms,
                           mirrored, per_tower, sync, tower_alone, training_flops_per_image)
from repro.model import AlexNet
from repro.prepare import prepare
from repro.progress import ConsoleFilter, duration, number
from repro.run import Run
from repro.runtime import resolve_devices, use_devices
from repro.store import PreparedStore
from repro.train import train

TORCH_FLOOR = "2.4"  # setup.cfg's torch>=2.4
SEED = 0
# float32 results on other devices or paths against the CPU's, as a fraction of the reference's largest |value|
# (the loss: of the loss). Measured on the CPU at the paper's initialisation, batch 8: IEEE float32 is off from
# float64 by 5e-7 in the logits, 0 in the loss and at most 3e-6 in any gradient; with the convolutions' and matrix
# products' inputs rounded to TF32's 10-bit mantissa (simulated), by 4e-4 in the logits, 2e-6 in the loss and
# 6e-2 to 1e-1 in conv1's and conv2's gradients. The bounds leave room for cuDNN's algorithms (other summation
# orders, Winograd, FFT) and still catch TF32 (the logits by 4x, conv1 by 60x).
LOGITS_TOLERANCE, LOSS_TOLERANCE, GRADIENT_TOLERANCE = 1e-4, 1e-5, 1e-3
# The lowest cosine similarity allowed between a layer's gradient under autocast and in float32. Measured on the
# CPU at the paper's start (weights of std 0.01, biases of 1; a gradient that is a sum with much cancellation):
# bf16 0.91 (conv1) to 1.0, fp16 0.99 to 1.0. The floors catch a broken path (an overflow, a layer left out of the
# float32 fallbacks, a gradient lost), not rounding.
COSINE_FLOORS = {"bf16": 0.8, "fp16": 0.95}
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Two towers' keep decisions agree on half the units when independent, on all of them when drawn alike.
MAX_MASK_AGREEMENT = 0.75
# The resume check, small enough for a CPU: one epoch of 8 images in batches of 2 (4 steps), a checkpoint every 2
# steps; stopped right after the checkpoint at step 2 (mid-epoch), resumed for the last 2.
RESUME_IMAGES, RESUME_BATCH, RESUME_EPOCHS, RESUME_EVERY, RESUME_STOP = 8, 2, 1, 2, 2
READ_SECONDS, READ_BATCHES = 10.0, 50  # the store's read rate: whichever ends first, after the first batch
# The towers overlap when forward + backward of both takes at most this times the slower tower alone plus the
# exchange's copies alone (each copy between the GPUs is a barrier for both: ATen's copy_device_to_device).
OVERLAP_TARGET = 1.1
# A training run in a process of its own (the resume of randomness-resume): the overrides are its arguments.
TRAIN_IN_A_NEW_PROCESS = ("import sys; from repro.config import composed; from repro.train import train; "
                          "train(composed('train', sys.argv[1:]))")


@dataclass
class Result:
    """One check's outcome: PASS, FAIL or SKIP, a one-line summary with its numbers, and the details for the JSON."""

    status: str
    summary: str
    details: dict = field(default_factory=dict)
    name: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.summary}"


def passed(summary: str, **details) -> Result:
    return Result("PASS", summary, details)


def failed(summary: str, **details) -> Result:
    return Result("FAIL", summary, details)


def skipped(summary: str, **details) -> Result:
    return Result("SKIP", summary, details)


def check_passes(ok: bool, summary: str, **details) -> Result:
    return Result("PASS" if ok else "FAIL", summary, details)


class Box:
    """The machine under test and the choices of this run; caches what several checks share."""

    def __init__(self, devices: list[str], batch: int, steps: int, repeats: int, store: Path | None, workers: int,
                 compile: bool, workdir: Path):
        self.devices = [torch.device(d) for d in devices]
        self.gpus = [d for d in distinct(self.devices) if d.type == "cuda"]
        self.two_gpus = len(self.gpus) == 2
        self.batch, self.steps, self.repeats = batch, steps, repeats
        self.store, self.workers, self.compile, self.workdir = store, workers, compile, workdir
        # Small batches for the numerical checks: the CPU reference (and fp16 on the CPU) is slow.
        self.numerics_batch = 8 if self.gpus else 2
        self.cache: dict = {}

    def cached(self, key: str, make: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def prepared_store(self) -> PreparedStore:
        """`store`, opened (and checked) once for every check that reads it."""
        return self.cached("store", lambda: PreparedStore(self.store))

    def no_gpus(self, what: str) -> Result:
        visible = f"{len(self.gpus)} GPU among the devices" if self.gpus else "no GPU among the devices"
        return skipped(f"{what} ({visible}: {', '.join(map(str, self.devices))})")


def numerics_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(batch, 3, 224, 224, generator=generator) * 60, torch.randint(0, 1000, (batch,),
                                                                                      generator=generator)


def gradients(model: AlexNet, images: torch.Tensor, labels: torch.Tensor, scaler=None) -> dict:
    """Logits, loss and every parameter's gradient (on the CPU) of one forward and backward pass in eval mode (no
    dropout draws: the CPU's and the GPUs' generators differ), the loss scaled by `scaler` when given."""
    model.eval()
    model.zero_grad(set_to_none=True)
    logits = model(per_tower(images, model.devices))
    loss = F.cross_entropy(logits, labels.to(model.devices[0]))
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return {"logits": logits.detach().float().cpu(), "loss": loss.detach().float().cpu(),
            "grads": {name: p.grad.detach().float().cpu() for name, p in model.named_parameters()}}


def reference(box: Box) -> dict:
    """The CPU float32 reference: the two-tower network from SEED on the CPU, its weights and `gradients`."""

    def make():
        torch.manual_seed(SEED)
        model = AlexNet()
        images, labels = numerics_batch(box.numerics_batch)
        return {"model": model, "state": {k: v.clone() for k, v in model.state_dict().items()},
                **gradients(model, images, labels)}

    return box.cached("reference", make)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def against_reference(record: dict, ref: dict) -> tuple[bool, str, dict]:
    """Compare `gradients` output with the reference's, within the stated tolerances."""
    logits, loss = relative(record["logits"], ref["logits"]), relative(record["loss"], ref["loss"])
    errors = {name: relative(grad, ref["grads"][name]) for name, grad in record["grads"].items()}
    worst = max(errors, key=errors.get)
    ok = logits <= LOGITS_TOLERANCE and loss <= LOSS_TOLERANCE and errors[worst] <= GRADIENT_TOLERANCE
    text = (f"logits {logits:.1e}, loss {loss:.1e}, worst gradient {errors[worst]:.1e} ({worst}) of the CPU float32 "
            f"values (allowed {LOGITS_TOLERANCE:.0e} / {LOSS_TOLERANCE:.0e} / {GRADIENT_TOLERANCE:.0e})")
    return ok, text, {"logits": logits, "loss": loss, "gradients": errors}


# -- inventory ------------------------------------------------------------------------------------------------------

def check_inventory(box: Box) -> Result:
    from torch.torch_version import TorchVersion

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": nccl_version(), "gpus_visible": torch.cuda.device_count(), "devices": list(map(str, box.devices)),
            "precision": speed.precision(), "cpu_float32_matmul": torch.get_float32_matmul_precision()}
    gpus = []
    info["arch_list"] = torch.cuda.get_arch_list() if box.gpus else []
    for device in box.gpus:
        props = torch.cuda.get_device_properties(device)
        gpus.append({"device": str(device), "name": props.name, "memory_bytes": props.total_memory,
                     "compute_capability": f"{props.major}.{props.minor}", "bf16": bf16_native([device]),
                     "kernels": has_kernels((props.major, props.minor), info["arch_list"])})
    info["gpus"] = gpus
    if box.two_gpus:
        a, b = (d.index for d in box.gpus)
        info["peer_access"] = {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b),
                               f"{b}->{a}": torch.cuda.can_device_access_peer(b, a)}
    parts = [f"torch {info['torch']}", f"CUDA {info['cuda'] or 'none'}", f"cuDNN {info['cudnn'] or 'none'}",
             f"NCCL {info['nccl'] or 'none'}"]
    if gpus:
        parts += [f"{g['device']} {g['name']} ({g['memory_bytes'] / 2**30:.1f} GiB, sm {g['compute_capability']}, "
                  f"bf16 {'native' if g['bf16'] else 'NOT native'})" for g in gpus]
    else:
        parts.append(f"{info['gpus_visible']} GPU(s) visible, devices {', '.join(info['devices'])}")
    if "peer_access" in info:
        parts.append("peer access " + ("yes" if all(info["peer_access"].values()) else
                                       "NO (copies go through host memory)"))
    precision = info["precision"]
    parts.append(f"float32 convolutions {precision['float32_convolutions']}, matmuls {precision['float32_matmuls']}")
    ok = TorchVersion(torch.__version__) >= TORCH_FLOOR
    if not ok:
        parts.insert(0, f"torch {torch.__version__} is older than {TORCH_FLOOR} (setup.cfg's floor): upgrade it")
    for g in gpus:
        if g["kernels"] is False:
            ok = False
            parts.insert(0, f"{g['device']} {g['name']} (sm {g['compute_capability']}) has no kernels in this torch "
                            f"build (built for {' '.join(info['arch_list'])}): install a torch wheel built for it")
    return check_passes(ok, "; ".join(parts), **info)


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool | None:
    """Whether a torch build compiled for `arch_list` (`torch.cuda.get_arch_list()`: sm_XY machine code, compute_XY
    PTX) runs on a GPU of compute `capability`: machine code of the same major version and a minor version not above
    the GPU's (an `a` variant such as sm_90a: that GPU exactly), or PTX of a version not above it, which the driver
    compiles. None when the build lists no architectures (nothing to compare)."""
    if not arch_list:
        return None
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if not match:
            continue
        kind, major, minor, variant = match[1], int(match[2]), int(match[3]), match[4]
        if kind == "compute" and (major, minor) <= capability:
            return True
        if kind == "sm" and major == capability[0] and (minor == capability[1] if variant == "a" else
                                                        minor <= capability[1]):
            return True
    return False


def bf16_native(gpus) -> bool:
    """Whether every GPU of `gpus` computes in bf16 itself: compute capability 8.0 and newer (what
    `torch.cuda.is_bf16_supported(including_emulation=False)` checks, for the current GPU only; by default it also
    counts emulation, which is slow and lacks cuDNN's bf16 convolutions), or any ROCm GPU."""
    return all(torch.version.hip or torch.cuda.get_device_properties(gpu).major >= 8 for gpu in gpus)


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # a build without CUDA or NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def check_network(box: Box) -> Result:
    """The address gloo (the default backend's CPU collectives: the run folder's name, the checkpoint step, the stop
    signal) listens on: GLOO_SOCKET_IFNAME's interface, else the first address this host's name resolves to that it
    can bind (ProcessGroupGloo's createDefaultDevice). Across boxes that must not be a loopback address."""
    world = World.from_env()
    several = world.launched and world.size > world.local_size
    where = (f"torchrun, {world.size} processes on several boxes" if several else
             "torchrun, one box" if world.launched else "one process")
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        return passed(f"{where}: GLOO_SOCKET_IFNAME={interface}, gloo talks on that interface (NCCL: "
                      f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME', 'unset, its own choice')})",
                      interface=interface, several_boxes=several)
    hostname = socket.gethostname()
    try:
        address = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as error:
        address, reason = None, f"{hostname} does not resolve ({error})"
    else:
        reason = f"{hostname} resolves to {address}"
    unusable = address is None or ipaddress.ip_address(address.split("%")[0]).is_loopback
    fix = ("set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface the boxes share (e.g. eth0; `ip -brief "
           "address` lists them) on every box, or map the host's name to that interface's address in /etc/hosts")
    wait = f"{TIMEOUT.total_seconds() / 60:.0f} minutes"
    if several and unusable:
        return failed(f"{where}: {reason}, which no other box reaches: gloo would listen there ('connectFullMesh "
                      f"failed', or a wait of {wait}); {fix}", hostname=hostname, address=address)
    note = f" (no other box reaches it: before training on several boxes, {fix})" if unusable else ""
    return passed(f"{where}: {reason}{note}" + ("" if several else "; on one box any local address works"),
                  hostname=hostname, address=address, several_boxes=several)


# -- numerics -------------------------------------------------------------------------------------------------------

def check_numerics_towers(box: Box) -> Result:
    """The tower path (what training runs unless speed.grouped) on the box's GPUs: two, or both towers on one."""
    if not box.gpus:
        return box.no_gpus("needs a GPU: on the CPU the tower path is the reference itself")
    ref = reference(box)
    speed.set_cudnn_benchmark(None, deterministic=False)  # as training: cuDNN picks its algorithms
    torch.manual_seed(SEED)
    model = AlexNet(devices=box.devices)
    state = model.state_dict()
    different = [name for name, value in ref["state"].items() if not torch.equal(state[name].cpu(), value)]
    images, labels = numerics_batch(box.numerics_batch)
    ok, text, errors = against_reference(gradients(model, images, labels), ref)
    weights = (f"weights from seed {SEED} bit-equal to the CPU's ({len(state)} tensors)" if not different else
               f"{len(different)} weight tensors differ from the CPU's for the same seed ({different[0]}, ...)")
    where = f"the tower path on {', '.join(map(str, box.devices))}"
    return check_passes(ok and not different, f"{where}: {weights}; {text}", weights_differ=different, errors=errors,
                        batch=box.numerics_batch, devices=list(map(str, box.devices)))


def check_numerics_grouped(box: Box) -> Result:
    ref = reference(box)
    device = box.devices[0]
    speed.set_cudnn_benchmark(None, deterministic=False)
    torch.manual_seed(SEED)
    model = speed.apply(AlexNet(devices=(device, device)), SpeedConfig(grouped=True))
    images, labels = numerics_batch(box.numerics_batch)
    ok, text, errors = against_reference(gradients(model, images, labels), ref)
    where = "on the CPU, against the tower path" if device.type == "cpu" else f"on {device}"
    return check_passes(ok, f"speed.grouped {where}: {text}", errors=errors, batch=box.numerics_batch)


def float32_on_devices(box: Box) -> dict:
    """The float32 network and its `gradients` on the run's devices (the CPU reference itself on the CPU)."""
    if box.devices[0].type == "cpu" and box.devices[1].type == "cpu":
        return reference(box)

    def make():
        torch.manual_seed(SEED)
        model = AlexNet(devices=box.devices)
        images, labels = numerics_batch(box.numerics_batch)
        return {"model": model, **gradients(model, images, labels)}

    return box.cached("float32", make)


def layer_gradient(grads: dict, layer: str) -> torch.Tensor:
    """Every gradient value of `layer` (both towers' weights and biases) in one vector."""
    return torch.cat([g.flatten() for name, g in grads.items() if name.split(".")[-2] == layer]).double()


def check_numerics_autocast(box: Box) -> Result:
    base = float32_on_devices(box)
    images, labels = numerics_batch(box.numerics_batch)
    cosines, notes, ok = {}, [], True
    for name, floor in COSINE_FLOORS.items():
        if name == "bf16" and box.gpus and not bf16_native(box.gpus):
            notes.append("bf16 not native on these GPUs")
            continue
        options = SpeedConfig(autocast=name)
        model = speed.apply(copy.deepcopy(base["model"]), options)
        record = gradients(model, images, labels, speed.grad_scaler(options, box.devices[0]))
        del model
        cosines[name] = {layer: F.cosine_similarity(layer_gradient(record["grads"], layer),
                                                    layer_gradient(base["grads"], layer), dim=0).item()
                         for layer in LAYERS}
        lowest = min(cosines[name], key=cosines[name].get)
        value = cosines[name][lowest]
        ok = ok and value >= floor  # NaN (an overflow) fails too
        notes.append(f"{name} lowest {value:.3f} ({lowest}; floor {floor})")
    where = "on the CPU" if box.devices[0].type == "cpu" else "on " + ", ".join(map(str, distinct(box.devices)))
    return check_passes(ok, f"cosine of each layer's gradient with float32's {where}, batch {box.numerics_batch}: "
                        + "; ".join(notes), cosines=cosines)


# -- placement ------------------------------------------------------------------------------------------------------

def check_placement_input(box: Box) -> Result:
    """Each tower's input from a uint8 batch through `speed.prefetch` (side streams on GPUs) and `Augment`: on its
    own device, float32 NCHW-contiguous, equal to the input built on the CPU, and no copy between two GPUs."""
    rng = np.random.default_rng(SEED)
    mean = rng.uniform(0, 255, (256, 256, 3))
    eigvecs = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    eigvals = np.array([5000.0, 300.0, 40.0])
    images = torch.from_numpy(rng.integers(0, 256, (box.numerics_batch, 256, 256, 3), dtype=np.uint8))
    labels = torch.arange(box.numerics_batch)
    expected = Augment(mean, eigvals, eigvecs).train(images, step_rng(SEED, 0, 0))[0]
    augment = Augment(mean, eigvals, eigvecs, devices=box.devices)
    loader = [(images.pin_memory() if box.gpus else images, labels)]
    with CrossDeviceCopies() as recorder:
        for sent, _ in speed.prefetch(loader, box.devices):
            inputs = augment.train(sent, step_rng(SEED, 0, 0))
    problems = []
    for tower, (x, device) in enumerate(zip(inputs, box.devices)):
        if x.device != device:
            problems.append(f"tower {tower}'s input is on {x.device}, not {device}")
        if x.dtype != torch.float32 or not x.is_contiguous():
            problems.append(f"tower {tower}'s input is {x.dtype} with strides {x.stride()}, not float32 NCHW")
    worst = max((x.cpu() - expected).abs().max().item() for x in inputs)
    if worst > 1e-3:  # the same IEEE operations on the same numbers: equal, up to a non-IEEE division
        problems.append(f"the inputs differ from the CPU's by up to {worst:.3g} grey levels")
    between = [c for c in recorder.copies if c[0] != "cpu" and c[1] != "cpu"]
    if between:
        problems.append(f"{len(between)} copies between devices: {between[:3]}")
    to_devices = Counter(dst for src, dst, _ in recorder.copies if src == "cpu")
    sent_by = "speed.prefetch (side streams)" if box.gpus else "no prefetch copies (CPU)"
    summary = (f"each tower's input built on {', '.join(map(str, box.devices))} via {sent_by}, float32 "
               f"NCHW-contiguous, max |difference| from the CPU's {worst:.1g}; host-to-device copies "
               f"{dict(to_devices) or 'none'}, between devices {len(between)}")
    return check_passes(not problems, "; ".join(problems) or summary, copies=recorder.copies, max_difference=worst)


def exchange_placement(model: AlexNet, inputs, labels: torch.Tensor) -> Result:
    """The cross-device copies of one forward and backward pass of `model` against the paper's exchange: pool2,
    pool5 and fc6 both ways and tower 1's fc7 to fc8 forward, and their gradients back; nothing else. Forward, each
    exchange's copies must be dispatched together, before anything of the next stage (`repro.model.exchange`)."""
    with CrossDeviceCopies() as forward:
        loss = F.cross_entropy(model(inputs), labels)
    with CrossDeviceCopies() as backward:
        loss.backward()
    expected = exchange_copies(len(labels), model.devices)
    problems, details = [], {}
    for part, got, want in (("forward", forward.copies, expected), ("backward", backward.copies, mirrored(expected))):
        extra, missing = Counter(got) - Counter(want), Counter(want) - Counter(got)
        details[part] = got
        if extra:
            problems.append(f"{part}: unexpected {sorted(extra.elements())}")
        if missing:
            problems.append(f"{part}: missing {sorted(missing.elements())}")
    rounds = exchange_rounds(len(labels), model.devices)
    details["forward_rounds"] = forward.rounds
    if not problems and [sorted(r) for r in forward.rounds] != [sorted(r) for r in rounds]:
        problems.append(f"forward: the copies were dispatched in {len(forward.rounds)} rounds "
                        f"({[len(r) for r in forward.rounds]} copies), not one round per exchange "
                        f"({[len(r) for r in rounds]}): work queued between the copies of an exchange makes the "
                        "towers take turns (each copy waits for everything queued on both GPUs)")
    summary = (f"{len(forward.copies)} copies forward (pool2, pool5, fc6 both ways, fc7 to fc8) in "
               f"{len(forward.rounds)} rounds, one per exchange, and {len(backward.copies)} back, exactly the exchange")
    return check_passes(not problems, "; ".join(problems) or summary, **details)


def check_placement_exchange(box: Box) -> Result:
    if not box.two_gpus:
        return box.no_gpus("needs two GPUs: on one device the towers exchange nothing")
    torch.manual_seed(SEED)
    model = AlexNet(devices=box.devices).train()
    images, labels = numerics_batch(box.numerics_batch)
    return exchange_placement(model, per_tower(images, model.devices), labels.to(box.devices[0]))


# -- randomness -----------------------------------------------------------------------------------------------------

def check_randomness_dropout(box: Box) -> Result:
    model = float32_on_devices(box)["model"].train()
    images, _ = numerics_batch(box.numerics_batch)
    inputs = per_tower(images, model.devices)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(((i[0] != 0).cpu(), (o != 0).cpu())))
             for tower in model.towers for layer in (tower.dropout6, tower.dropout7)]

    def masks(seed: int) -> list:
        """[(tower 0 fc6, tower 1 fc6), (tower 0 fc7, tower 1 fc7)], each (input non-zero, kept)."""
        seen.clear()
        seed_dropout(seed, box.devices)
        with torch.no_grad():
            model(inputs)  # the hooks fire tower by tower, fc6 then fc7
        return [(seen[0], seen[1]), (seen[2], seen[3])]

    def agreement(a, b) -> float:
        """The fraction of units (non-zero in both inputs) that both masks keep or both drop."""
        known = a[0] & b[0]
        return (a[1] == b[1])[known].float().mean().item()

    try:
        first, again, other = masks(1234), masks(1234), masks(1235)
    finally:
        for hook in hooks:
            hook.remove()
    repeat = all(torch.equal(x[1], y[1]) for pair_x, pair_y in zip(first, again) for x, y in zip(pair_x, pair_y))
    towers = [agreement(*pair) for pair in first]
    seeds = [agreement(x, y) for pair_x, pair_y in zip(first, other) for x, y in zip(pair_x, pair_y)]
    ok = repeat and max(towers) < MAX_MASK_AGREEMENT and max(seeds) < MAX_MASK_AGREEMENT
    summary = (f"the same step seed {'repeats' if repeat else 'does NOT repeat'} the masks; the towers agree on "
               f"{100 * towers[0]:.1f}% (fc6) and {100 * towers[1]:.1f}% (fc7) of units, another seed on "
               f"{100 * max(seeds):.1f}% at most (independent: 50%, allowed below {100 * MAX_MASK_AGREEMENT:.0f}%)")
    return check_passes(ok, summary, repeat=repeat, tower_agreement=towers, seed_agreement=seeds)


@contextlib.contextmanager
def quiet_training(buffer: io.StringIO):
    """Send the training's console lines and progress bars to `buffer` (its train.log is written as usual)."""
    log = logging.getLogger("repro")
    consoles = [h for h in log.handlers if any(isinstance(f, ConsoleFilter) for f in h.filters)]
    handler = logging.StreamHandler(buffer)
    for console in consoles:
        log.removeHandler(console)
    log.addHandler(handler)
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        log.removeHandler(handler)
        for console in consoles:
            log.addHandler(console)


def synthetic_store(box: Box) -> Path:
    """A small prepared store in the ILSVRC-2012 layout (the demo generator, 4 classes), made once."""
    def make():
        raw, store = box.workdir / "raw", box.workdir / "store"
        make_demo_data(raw, num_classes=4, train_per_class=4, val_per_class=2, seed=SEED)
        prepare(raw, store, skip_bad=True, workers=1)
        return store

    return box.cached("synthetic_store", make)


def resume_overrides(store: Path, run_dir: Path, devices) -> list[str]:
    return ["experiment=tiny", f"data.store={store}", f"run_dir={run_dir}", "deterministic=true",
            f"devices=[{','.join(map(str, devices))}]", f"data.limit_train={RESUME_IMAGES}",
            f"data.batch_size={RESUME_BATCH}", "data.limit_val=1", f"schedule.max_epochs={RESUME_EPOCHS}",
            f"checkpoint_every={RESUME_EVERY}", f"log_every={RESUME_EVERY}"]


def train_in_a_new_process(overrides: list[str]) -> None:
    """`repro.train.train` of the run `overrides` describes, in a process of its own, as after a real restart (a
    new process may choose other cuDNN and cuBLAS kernels); RunError with the end of its output if it fails."""
    done = subprocess.run([sys.executable, "-c", TRAIN_IN_A_NEW_PROCESS, *overrides], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RunError(f"the resumed run's process ended with status {done.returncode}: "
                       + (done.stderr.strip().splitlines() or ["no output"])[-1] + "\n" + done.stderr[-4000:])


def check_randomness_resume(box: Box) -> Result:
    """The real training code, deterministic: a run of k+m steps, and a copy of its folder taken right after its
    checkpoint at step k (what a kill at that moment leaves) resumed in a new process for the last m steps; the two
    must end with the same weights and velocities, bit for bit. On two GPUs the copy is also resumed on the first
    GPU alone."""
    store = synthetic_store(box)
    folder = box.workdir / "resume"
    one_gpu = [box.devices[0]] * 2
    copies = ["resumed", "one_gpu"] if box.two_gpus else ["resumed"]
    original_save = Run.save

    def save_then_copy(run, best: bool = False) -> None:
        original_save(run, best)
        if run.global_step == RESUME_STOP:
            for name in copies:
                shutil.copytree(run.dir, folder / name)

    buffer = io.StringIO()
    try:
        with quiet_training(buffer):
            with mock.patch.object(Run, "save", save_then_copy):
                train(composed("train", resume_overrides(store, folder / "uninterrupted", box.devices)))
        if not (folder / "resumed").is_dir():
            return failed(f"the run wrote no checkpoint at step {RESUME_STOP}", log=buffer.getvalue()[-4000:])
        train_in_a_new_process(resume_overrides(store, folder / "resumed", box.devices))
        if box.two_gpus:  # a checkpoint of two GPUs resumes on one (checkpoints hold no generator state)
            train_in_a_new_process(resume_overrides(store, folder / "one_gpu", one_gpu))
    except Exception as error:  # RunError, a kernel refusing deterministic mode, ...: the log says where
        return failed(f"training failed: {type(error).__name__}: {error}", log=buffer.getvalue()[-4000:])
    same = same_training_state(folder / "uninterrupted", folder / "resumed")
    different, compared = same["different"], same["compared"]
    steps = RESUME_EPOCHS * RESUME_IMAGES // RESUME_BATCH
    ok = same["resumed"] and not different and same["steps"] == [steps, steps]
    summary = (f"{RESUME_STOP} steps, a checkpoint, a resume in a new process and {steps - RESUME_STOP} more equal "
               f"{steps} uninterrupted steps: {compared - len(different)} of {compared} weight and velocity tensors "
               f"bit for bit (deterministic=true, on {', '.join(map(str, box.devices))})")
    if different:
        summary += f"; different: {different[:3]}"
    if not same["resumed"]:
        summary += "; but the second run did not resume (no 'resuming' in its train.log)"
    if box.two_gpus:
        finished = load_checkpoint(folder / "one_gpu" / "checkpoints" / "last.pt")["global_step"] == steps
        ok = ok and finished
        summary += f"; the step-{RESUME_STOP} checkpoint resumed on {one_gpu[0]} alone " + (
            "finished too" if finished else "did NOT finish")
    return check_passes(ok, summary, different=different, steps=same["steps"])


def same_training_state(uninterrupted: Path, resumed: Path) -> dict:
    """Two run folders' last checkpoints compared bit for bit: `different` (the weight and velocity tensors that
    differ), `compared` (how many there are), `steps` (each one's global step), and `resumed` (the second run's
    train.log says it resumed)."""
    a = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    tensors = [(f"model.{k}", v, b["model"][k]) for k, v in a["model"].items()]
    tensors += [(f"velocity.{i}", s["velocity"], b["optimizer"]["state"][i]["velocity"])
                for i, s in a["optimizer"]["state"].items()]
    return {"different": [name for name, x, y in tensors if not torch.equal(x, y)], "compared": len(tensors),
            "steps": [a["global_step"], b["global_step"]], "resumed": "resuming" in (resumed / "train.log").read_text()}


# -- speed ----------------------------------------------------------------------------------------------------------

def speed_configs(box: Box) -> list[tuple[str, SpeedConfig, list]]:
    """(label, options, devices) of every timed configuration: float32 first, then one speed option each."""
    configs = [("float32", SpeedConfig(), box.devices), ("channels_last", SpeedConfig(channels_last=True), box.devices)]
    if box.gpus:
        configs.append(("tf32", SpeedConfig(tf32=True), box.devices))
    configs += [("bf16", SpeedConfig(autocast="bf16"), box.devices),
                ("fp16", SpeedConfig(autocast="fp16"), box.devices)]
    one = [box.devices[0]] * 2
    configs.append(("grouped" if box.devices == one else f"grouped on {one[0]}", SpeedConfig(grouped=True), one))
    if box.compile:
        configs.append(("compile", SpeedConfig(compile=True), box.devices))
    return configs


@contextlib.contextmanager
def gpu_sync_warnings(gpus: list):
    """On GPUs, torch's sync debug mode: a warning (recorded) for every CUDA operation that makes the host wait."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if gpus:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if gpus:
                torch.cuda.set_sync_debug_mode("default")


def time_options(box: Box) -> dict:
    """Every configuration of `speed_configs` at the run's batch: its host syncs in one step and, on GPUs, its peak
    memory per GPU and its step time (medians of repeats). On the CPU only float32 is timed (`make bench` times
    the options there). An error is recorded in place of the numbers."""

    def make():
        rows = {}
        for label, options, devices in speed_configs(box):
            if label == "bf16" and box.gpus and not bf16_native(box.gpus):
                rows[label] = {"skipped": "bf16 not native on these GPUs"}
                continue
            speed.set_precision(options.tf32)
            speed.set_cudnn_benchmark(None, deterministic=False)  # as training: on unless deterministic
            step = model = None
            try:
                model = build(options, devices)  # the same weights for every option (one seed)
                step = TrainingStep(model, options, box.batch)
                row = {"devices": list(map(str, distinct(devices)))}
                for _ in range(2 if box.gpus else 0):
                    step.step()  # warm-up: cuDNN's autotuning, the allocator, compilation
                if not options.compile:  # a dispatch mode inside compiled code would be traced, not count
                    with HostSyncs() as host, gpu_sync_warnings(box.gpus) as caught:
                        step.step()
                    row["host_syncs"] = host.count
                    row["cuda_sync_warnings"] = [str(w.message)[:200] for w in caught
                                                 if "synchroniz" in str(w.message)]
                if box.gpus:
                    row["peak_memory_per_gpu"] = gpu_peak_memory(step.step, step.devices)
                if box.gpus or label == "float32":
                    times = [step.seconds(box.steps) for _ in range(box.repeats)]
                    row.update(step_s=statistics.median(times), step_s_repeats=times,
                               images_per_s=box.batch / statistics.median(times))
            except Exception as error:  # noqa: BLE001 (reported as this option's failure)
                row = {"error": f"{type(error).__name__}: {error}"}
            finally:
                speed.set_precision(False)
                del step, model
                if box.gpus:
                    torch.cuda.empty_cache()
            rows[label] = row
        return rows

    return box.cached("timings", make)


def check_speed_step(box: Box) -> Result:
    rows = time_options(box)
    flops = box.cached("flops", lambda: training_flops_per_image(SpeedConfig()))
    errors = {label: row["error"] for label, row in rows.items() if "error" in row}
    parts = []
    for label, row in rows.items():
        if "images_per_s" in row:
            row["achieved_flops"] = row["images_per_s"] * flops
            parts.append(f"{label} {number(row['images_per_s'])}")
        elif "error" in row or "skipped" in row:
            parts.append(f"{label} {'error' if 'error' in row else 'skipped'}")
    if not box.gpus:
        parts.append(f"{', '.join(label for label in rows if label != 'float32')} timed on GPUs only "
                     "(make bench times them on the CPU)")
    float32 = rows["float32"]
    achieved = (f"; float32 achieves {number(float32['achieved_flops'] / 1e12)} TFLOP/s ({flops / 1e9:.2f} GFLOP a "
                f"training image, counted)" if "achieved_flops" in float32 else "")
    summary = f"images/s at batch {box.batch}: " + ", ".join(parts) + achieved
    if errors:
        summary = f"{len(errors)} option(s) failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
    return check_passes(not errors, summary, batch=box.batch, flops_per_image=flops, options=rows)


def check_speed_host_syncs(box: Box) -> Result:
    rows = {label: row for label, row in time_options(box).items() if "host_syncs" in row}
    if not rows:
        return failed("no configuration ran (see speed-step)")
    syncs = {label: row["host_syncs"] + len(row["cuda_sync_warnings"]) for label, row in rows.items()}
    how = "value reads at dispatch" + (" and torch.cuda's sync debug mode" if box.gpus else "")
    bad = {label: n for label, n in syncs.items() if n}
    summary = (f"{sum(syncs.values())} host syncs in a training step of {', '.join(rows)} ({how})" if not bad else
               f"host syncs in a training step: {bad} ({how}); each one stalls the GPUs every step")
    return check_passes(not bad, summary, syncs=syncs)


def check_speed_memory(box: Box) -> Result:
    if not box.gpus:
        return box.no_gpus("peak memory per GPU needs GPUs")
    rows = time_options(box)
    parts = [f"{label} " + ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in row["peak_memory_per_gpu"].items())
             for label, row in rows.items() if "peak_memory_per_gpu" in row]
    return passed(f"peak allocated in a batch-{box.batch} step: " + "; ".join(parts),
                  peak_memory_per_gpu={k: r.get("peak_memory_per_gpu") for k, r in rows.items()})


def check_speed_overlap(box: Box) -> Result:
    if not box.two_gpus:
        return box.no_gpus("needs two GPUs")
    speed.set_cudnn_benchmark(None, deterministic=False)
    step = TrainingStep(build(SpeedConfig(), box.devices), SpeedConfig(), box.batch)
    model = step.model
    both = median_ms(forward_backward(model, step.inputs, step.labels), box.devices, box.steps, box.repeats)
    alone = [median_ms(tower_alone(tower, x), [device], box.steps, box.repeats)
             for tower, x, device in zip(model.towers, step.inputs, model.devices)]
    copies = exchange_ms(box)["ms"]
    ratio, bound = both / max(alone), OVERLAP_TARGET * (max(alone) + copies)
    summary = (f"forward + backward of both towers {both:.1f} ms; tower 0 alone {alone[0]:.1f} ms, tower 1 alone "
               f"{alone[1]:.1f} ms, the exchange's copies alone {copies:.2f} ms: {ratio:.2f}x the slower tower (1 = "
               f"the towers at once, 2 = one after the other; allowed: {OVERLAP_TARGET}x the slower tower plus the "
               f"copies, {bound:.1f} ms)")
    if both > bound:
        summary += ("; the towers take turns: each copy between the GPUs waits for all the work queued on both, so "
                    "look for work queued between an exchange's copies (placement-exchange checks their order) or a "
                    "host sync inside the step (speed-host-syncs)")
    return check_passes(both <= bound, summary, both_ms=both, alone_ms=alone, copies_ms=copies, ratio=ratio,
                        bound_ms=bound, batch=box.batch)


def exchange_ms(box: Box) -> dict:
    """The 14 exchange copies of a step at the run's batch, timed alone: milliseconds, bytes and copies."""

    def make() -> dict:
        copies = exchange_copies(box.batch, box.devices)
        copies += mirrored(copies)
        size = 4 * sum(int(np.prod(shape)) for _, _, shape in copies)
        return {"ms": median_ms(copy_work(copies), box.devices, box.steps, box.repeats), "bytes": size,
                "copies": len(copies)}

    return box.cached("exchange", make)


def check_speed_exchange(box: Box) -> Result:
    if not box.two_gpus:
        return box.no_gpus("needs two GPUs")
    copies = exchange_ms(box)
    ms, size = copies["ms"], copies["bytes"]
    return passed(f"the {copies['copies']} exchange copies of a batch-{box.batch} step ({size / 1e6:.1f} MB) take "
                  f"{ms:.2f} ms ({size / ms / 1e6:.1f} GB/s)", **copies)


def store_read_rates(box: Box) -> dict[str, float]:
    """Images/s the prepared store `box.store` delivers through the loader, measured once per preflight, by where
    its records are decoded (`data.decode`): `loader` (raw records, or JPEG decoded in the workers) and, for a
    JPEG store on GPUs, `gpu` (nvJPEG on the first tower's GPU)."""

    def make() -> dict[str, float]:
        split = box.prepared_store().split("train")
        decoders = {"loader": None}
        if split.records.spec["format"] == "jpeg" and box.gpus:
            decoders["gpu"] = box.devices[0]
        return {name: read_rate(split, box, device) for name, device in decoders.items()}

    return box.cached("store_rates", make)


def read_rate(split, box: Box, decode_on: torch.device | None) -> float:
    loader = iter(batches(split, box.batch, seed=SEED, workers=box.workers, pin_memory=bool(box.gpus),
                          decode_on=decode_on))
    next(loader)  # the workers' start-up
    images, start = 0, time.perf_counter()
    for images_batch, _ in loader:
        images += len(images_batch)
        if time.perf_counter() - start > READ_SECONDS or images >= READ_BATCHES * box.batch:
            break
    sync(box.gpus)  # the last batch decoded on a GPU
    return images / (time.perf_counter() - start)


def store_read_rate(box: Box) -> float:
    """The store's read rate with its faster decoder (`store_read_rates`)."""
    return max(store_read_rates(box).values())


def step_rates(box: Box) -> tuple[dict[str, float], list[str]]:
    """Images/s of every option that was timed, and the ones to report: float32 and the fastest."""
    rows = {label: row["images_per_s"] for label, row in time_options(box).items() if "images_per_s" in row}
    if not rows:
        return rows, []
    return rows, [label for label in dict.fromkeys(["float32", max(rows, key=rows.get)]) if label in rows]


def check_speed_store(box: Box) -> Result:
    if box.store is None:
        return skipped("no prepared store given (make preflight STORE=..., or store=...)")
    rates, rate = store_read_rates(box), store_read_rate(box)
    rows, reported = step_rates(box)
    records = box.prepared_store().records_spec
    held = "raw records" if records["format"] == "raw" else f"JPEG records of quality {records['quality']}"
    decoded = {"loader": "decoded in the loader" if records["format"] == "jpeg" else "",
               "gpu": f"with data.decode=gpu (nvJPEG on {box.devices[0]})"}
    parts = [f"{box.store} ({held}) reads " + ", ".join(f"{number(r)} images/s {decoded[name]}".rstrip()
                                                        for name, r in rates.items())
             + f" (workers={box.workers}, batch {box.batch})"]
    parts += [f"the {label} step consumes {number(rows[label])} ({number(rate / rows[label])}x"
              f"{', input-bound' if rate < rows[label] else ''})" for label in reported]
    return passed("; ".join(parts), images_per_s=rate, by_decoder=rates, records=records, workers=box.workers,
                  consumption=rows)


def check_speed_projection(box: Box) -> Result:
    rows, reported = step_rates(box)
    if not rows:
        return failed("no configuration ran (see speed-step)")
    store_rate = store_read_rate(box) if box.store is not None else None
    where = "the CPU" if box.devices[0].type == "cpu" else ", ".join(map(str, distinct(box.devices)))
    projections, parts = {}, []
    for label in reported:
        rate = min(rows[label], store_rate) if store_rate else rows[label]
        epoch = IMAGENET_TRAIN / rate
        projections[label] = {"images_per_s": rate, "epoch_s": epoch, "run_s": EPOCHS * epoch}
        bound = ", read-bound" if store_rate and store_rate < rows[label] else ""
        parts.append(f"{label} {duration(epoch)} an epoch, {duration(EPOCHS * epoch)} for {EPOCHS}{bound}")
    note = "" if store_rate else " (the step alone: give STORE= to bound it by the store's read rate)"
    return passed(f"on {where} at batch {box.batch}: " + "; ".join(parts) + note
                  + "; evaluation not included", projections=projections, images=IMAGENET_TRAIN, epochs=EPOCHS)


CHECKS: dict[str, Callable[[Box], Result]] = {
    "inventory": check_inventory,
    "network": check_network,
    "numerics-towers": check_numerics_towers,
    "numerics-grouped": check_numerics_grouped,
    "numerics-autocast": check_numerics_autocast,
    "placement-input": check_placement_input,
    "placement-exchange": check_placement_exchange,
    "randomness-dropout": check_randomness_dropout,
    "randomness-resume": check_randomness_resume,
    "speed-step": check_speed_step,
    "speed-host-syncs": check_speed_host_syncs,
    "speed-memory": check_speed_memory,
    "speed-overlap": check_speed_overlap,
    "speed-exchange": check_speed_exchange,
    "speed-store": check_speed_store,
    "speed-projection": check_speed_projection,
}


@contextlib.contextmanager
def restored_torch_state():
    """Undo what a check sets globally (training sets determinism, cuDNN's autotuner and the precision)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        speed.set_precision(False)


def run(box: Box, names: list[str], out: Path, command: str) -> int:
    """Run the checks `names`, print a line for each, write out/preflight.json; 0 if none failed, else 1."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = []
    for name in names:
        start = time.perf_counter()
        with restored_torch_state():
            try:
                result = CHECKS[name](box)
            except Exception as error:  # noqa: BLE001 (a check that cannot run has failed)
                result = failed(f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        result.name, result.seconds = name, time.perf_counter() - start
        results.append(result)
        print(result.line(), flush=True)
    failures = [r for r in results if r.status == "FAIL"]
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
              "devices": list(map(str, box.devices)), "batch": box.batch, "steps": box.steps, "repeats": box.repeats,
              "store": str(box.store) if box.store else None, "seconds": time.perf_counter() - started,
              "load_average_before_after": [load_before, os.getloadavg()[0]],
              "passed": not failures, "first_failure": failures[0].name if failures else None,
              "skipped": {r.name: r.summary for r in results if r.status == "SKIP"},
              "checks": [{"name": r.name, "status": r.status, "summary": r.summary, "seconds": r.seconds,
                          "details": r.details} for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    counts = Counter(r.status for r in results)
    tally = f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
    if failures:
        print(f"preflight: FAIL: {failures[0].name} failed first ({tally}); {out / 'preflight.json'} has the details",
              flush=True)
        return 1
    print(f"preflight: every check that ran passed ({tally}, {record['seconds']:.0f} s); wrote "
          f"{out / 'preflight.json'}", flush=True)
    return 0


def preflight(cfg, command: str = "repro-preflight") -> int:
    """Run the checks `cfg` (a `PreflightConfig` node) asks for; 0 when every check that ran passed, else 1."""
    names = list(cfg.checks) if cfg.checks else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise RunError(f"checks={unknown}: no such check; the checks are {', '.join(CHECKS)}")
    # deterministic=true (randomness-resume) needs cuBLAS's fixed workspace, read when cuBLAS first starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    devices = resolve_devices(cfg.devices, require_two_gpus=False)
    use_devices(devices)
    store = Path(cfg.store) if cfg.store else None
    gpu = torch.device(devices[0]).type == "cuda"
    out = Path(cfg.out) if cfg.out else Path("runs") / "preflight" / time.strftime("%Y-%m-%d_%H-%M-%S")
    speed.set_precision(False)  # IEEE float32, as training sets it
    with tempfile.TemporaryDirectory(prefix="repro-preflight-") as workdir:
        box = Box(devices, batch=cfg.batch_size or (128 if gpu else 2), steps=cfg.steps or (5 if gpu else 1),
                  repeats=cfg.repeats or (5 if gpu else 2), store=store, workers=cfg.workers, compile=cfg.compile,
                  workdir=Path(workdir))
        if store is not None:  # a store that cannot be read is one line before any check runs
            box.prepared_store().split("train")
        return run(box, names, out, command)
