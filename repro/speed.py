"""One-box speed options (`speed:` in the training config, `SpeedConfig`), applied to a built `AlexNet` in place.

None of them changes the parameters, their names or the checkpoint format, so a checkpoint written with any
options loads with any others. docs/speed.md has the measured effect of each and when it helps.

- grouped: both towers on one device run as one grouped network (`AlexNet.forward_grouped`); the same function,
  float32 sums in another order. Null (auto) turns it on exactly when the two towers share a device.
- channels_last: parameters and input in NHWC; another kernel choice, float32 throughout.
- autocast: bf16 or fp16 matrix products (torch.autocast); the response normalisation and the loss stay float32,
  fp16 adds a loss scaler (`grad_scaler`). Changes the numerics: off by default.
- compile: torch.compile of each tower's four stages and of fc8 separately, so no compiled region spans two
  devices (CUDA graphs and Inductor want single-device graphs); the grouped forward is one region. Compiled
  dropout draws its masks with Inductor's generator: the same distribution, not the eager path's masks.
- tf32: TensorFloat-32 convolutions and matrix products on Ampere and newer GPUs (10-bit mantissas). Off by
  default: float32 means IEEE float32 everywhere (`set_precision`), the paper's numerics.
- cudnn_benchmark: cuDNN's autotuner; its choice can differ between runs, so it contradicts `deterministic`.
- prefetch: on GPUs, the next batch's copies from pinned memory (to each tower's device) run on side streams while
  this step computes.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from repro.errors import RunError
from repro.model import AlexNet

AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
TOWER_STAGES = ("stem", "trunk", "head6", "head7")


def autocast_name(options) -> str | None:
    """`options.autocast` as None, "bf16" or "fp16" (a config node holds an enum member, a dict its name)."""
    value = options.autocast
    return getattr(value, "name", value)


def apply(model: AlexNet, options) -> AlexNet:
    """Set the options of `options` (a `SpeedConfig` or config node) on `model`, in place; returns it."""
    shared = len(model.towers) == 2 and model.devices[0] == model.devices[1]
    if options.grouped and not shared:
        raise RunError(f"speed.grouped=true needs two towers on one device; this model has {len(model.towers)} "
                       f"tower(s) on {[str(d) for d in model.devices]}. Leave speed.grouped unset (auto)")
    model.grouped = shared if options.grouped is None else bool(options.grouped)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        if model.grouped:
            model.forward_grouped = torch.compile(model.forward_grouped)
        else:
            for tower in model.towers:
                for stage in TOWER_STAGES:
                    setattr(tower, stage, torch.compile(getattr(tower, stage)))
            model.fc8.forward = torch.compile(model.fc8.forward)
    dtype = AUTOCAST_DTYPES[autocast_name(options)]
    if dtype is not None or options.channels_last:
        plain, device_type, channels_last = model.forward, model.devices[0].type, options.channels_last

        def forward(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
            if channels_last:  # the images, or each tower's copy
                x = ([t.contiguous(memory_format=torch.channels_last) for t in x] if isinstance(x, (list, tuple))
                     else x.contiguous(memory_format=torch.channels_last))
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                return plain(x).float()  # float32 logits, so the loss and the softmax are float32

        model.forward = forward  # an instance attribute: the module, its parameters and state_dict stay as they are
    return model


def set_cudnn_benchmark(requested: bool | None, deterministic: bool) -> None:
    """cuDNN's autotuner: `requested`, or on unless the run is deterministic."""
    if requested and deterministic:
        raise RunError("speed.cudnn_benchmark=true contradicts deterministic=true (the autotuner may pick other "
                       "kernels in another run); set one of them to false")
    torch.backends.cudnn.benchmark = (not deterministic) if requested is None else bool(requested)


def set_precision(tf32: bool) -> None:
    """IEEE float32 convolutions and matrix products, or TF32 ones where `tf32` (GPUs of compute capability 8.0 and
    newer; elsewhere nothing changes). Set explicitly because torch's own defaults differ: cuDNN convolutions default
    to TF32, cuBLAS matrix products to IEEE. These are the switches every supported torch has; in torch 2.9 and
    newer they also set the per-backend `fp32_precision` fields consistently (the new API: mixing the two makes
    torch raise, so nothing here uses it)."""
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def precision(options=None) -> dict:
    """The arithmetic in force, for train.log, metrics.json, repro-eval and the benchmarks: float32 convolutions and
    matrix products (`ieee` or `tf32`) and, given speed options, the autocast dtype (`float32` when off)."""
    mode = {True: "tf32", False: "ieee"}
    record = {"float32_convolutions": mode[torch.backends.cudnn.allow_tf32],
              "float32_matmuls": mode[torch.backends.cuda.matmul.allow_tf32]}
    if options is not None:
        record["autocast"] = autocast_name(options) or "float32"
    return record


def grad_scaler(options, device: str | torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 autocast (fp16's narrow range would flush small gradients to zero); a
    pass-through otherwise (bf16 has float32's range)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=autocast_name(options) == "fp16")


def prefetch(loader: Iterable, devices: Sequence[str | torch.device]) -> Iterator[list]:
    """The loader's (uint8 images, labels) batches, sent ahead: on GPUs batch k+1 is copied from pinned memory on
    a side stream per device while step k runs, the images to every distinct device of `devices` (the towers'; a
    {device: images} mapping that `Augment` reads) and the labels to the first; the compute streams wait only for
    those copies. Without GPUs the batches pass through unchanged."""
    devices = list(dict.fromkeys(torch.device(d) for d in devices))
    if devices[0].type != "cuda":
        yield from loader
        return
    copy_streams = {device: torch.cuda.Stream(device) for device in devices}

    def send(batch):
        images, labels = batch
        sent = {}
        for device, stream in copy_streams.items():
            if images.is_cuda:  # decoded on a GPU (data.decode=gpu) by its current stream: copy once that is done
                stream.wait_stream(torch.cuda.current_stream(images.device))
                images.record_stream(stream)
            with torch.cuda.stream(stream):
                sent[device] = images.to(device, non_blocking=True)
        with torch.cuda.stream(copy_streams[devices[0]]):
            labels = labels.to(devices[0], non_blocking=True)
        return sent, labels

    batches = iter(loader)
    pending = next(batches, None)
    pending = send(pending) if pending is not None else None
    while pending is not None:
        images, labels = pending
        for device, stream in copy_streams.items():
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            images[device].record_stream(compute)  # the copy stream's memory is in use until compute is done
        labels.record_stream(torch.cuda.current_stream(devices[0]))
        pending = next(batches, None)
        pending = send(pending) if pending is not None else None
        yield [images, labels]
