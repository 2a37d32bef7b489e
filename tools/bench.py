#!/usr/bin/env python
"""`make bench`: the data section (tools/bench_data.py; `make bench-data` runs it alone), then the compute section:
in one run, side by side with interleaved repeats, the matrix-multiply peak, training images/s of the paper's
two-tower network (plain and with each speed option) against torchvision's `alexnet` with the same loss and
optimiser step, each one's achieved FLOP/s as a fraction of that peak, the ratio per FLOP in every repeat, the
10-patch evaluation rate and the peak memory of a training step. The compute section runs where training would:
on the box's GPUs (two, or both towers on one; batch 128, the paper's) or else on the CPU (batch 32), and every
table names its devices. On GPUs also the per-tower step, the cross-device copies, synthetic vs real input and
images/s per GPU. Then the arithmetic for 2x A100, 2x H100 and 2x RTX 4090. Last the profile section
(tools/profile_layers.py, on the CPU): each layer's forward and backward time beside its FLOPs, for both networks.
Results go to docs/benchmarks.json (one entry per section; a section not measured is kept) and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bench_data
import profile_layers
from repro import speed
from repro.config import SpeedConfig
from repro.data import Augment, batches, step_rng
from repro.measure import (EPOCHS, IMAGENET_TRAIN, TrainingStep, build, copy_work, distinct, exchange_copies,
                           gpu_peak_memory, median_ms, mirrored, seconds_per_call, sync, tower_alone,
                           training_flops_per_image)
from repro.prepare import prepare
from repro.runtime import resolve_devices, use_devices
from repro.store import PreparedStore

ROOT = Path(__file__).resolve().parents[1]
GPU_BATCH, CPU_BATCH = 128, 32  # the paper's batch on GPUs; on the CPU what a repeat can afford
# Dense tensor peaks per GPU, no sparsity, from the vendors' data sheets (the same figures as
# ../shared/reference/performance.md): (bf16 with fp32 accumulation, fp32 without tensor cores), TFLOP/s.
GPU_PEAKS = {
    "A100 SXM 80GB": (312.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet"),
    "H100 SXM": (989.0, 67.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    "RTX 4090": (165.2, 82.6, "NVIDIA Ada Lovelace GPU architecture whitepaper, appendix"),
}
# The configurations timed side by side: label -> (network, speed options). `None` is torchvision's alexnet.
TRAIN_CONFIGS = {
    "two-tower, tower by tower (the default)": SpeedConfig(),
    "two-tower, grouped": SpeedConfig(grouped=True),
    "two-tower, grouped + channels_last": SpeedConfig(grouped=True, channels_last=True),
    "two-tower, grouped + bf16 autocast": SpeedConfig(grouped=True, autocast="bf16"),
    "two-tower, grouped + torch.compile": SpeedConfig(grouped=True, compile=True),
    "torchvision alexnet": None,
}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, device: str) -> float:
    """Best FLOP/s of an n x n matrix product over `repeats` timed runs."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = min(seconds_per_call(lambda: a @ b, [device], 4) for _ in range(repeats))
    return 2 * n**3 / best


def ten_patch_rate(batch: int, repeats: int, devices: list[str]) -> float:
    """Images/s of the 10-patch evaluation (§4.1: 10 views each, softmaxes averaged), default speed options."""
    model = build(SpeedConfig(), devices).eval()
    rng = np.random.default_rng(0)
    augment = Augment(rng.uniform(0, 255, (256, 256, 3)), np.ones(3), np.eye(3), devices=model.devices)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8))

    def once():
        with torch.no_grad():
            model(augment.test_views(images, ten_crop=True)).softmax(-1).view(batch, 10, -1).mean(1)
        sync(model.devices)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def memory_probe(kind: str, batch: int, devices: list[str]) -> dict:
    """Peak memory of one training step at `batch` (run in a fresh process by `peak_memory`). CPU: the growth of
    the process's peak resident set from a batch-1 step (weights, gradients, velocities already there) to a
    batch-`batch` step, i.e. what the batch adds. GPUs: torch.cuda.max_memory_allocated on each GPU of the model
    (the two-tower network on `devices`, torchvision's on the first), its peak reset on each."""
    options = None if kind == "torchvision" else SpeedConfig()
    trainer = TrainingStep(build(options, devices), options, 1)
    trainer.step()
    if torch.device(devices[0]).type == "cuda":
        del trainer
        trainer = TrainingStep(build(options, devices), options, batch)
        per_gpu = gpu_peak_memory(trainer.step, trainer.devices)
        return {"peak_bytes_per_step": sum(per_gpu.values()), "peak_bytes_per_gpu": per_gpu,
                "what": "torch.cuda.max_memory_allocated on each GPU of the model (weights, velocities, activations, "
                        "gradients and workspace), summed over them"}
    images = torch.randn(batch, 3, 224, 224) * 60
    trainer.inputs = [images, images] if options is not None else images  # both towers read one CPU batch
    trainer.labels = torch.randint(0, 1000, (batch,))
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak (VmHWM) from the current size
    before = resident_bytes("VmRSS")
    trainer.step()
    return {"peak_bytes_per_step": resident_bytes("VmHWM") - before, "resting_bytes": before,
            "what": f"the rise of the resident set during a batch-{batch} step over the process at rest (weights, "
                    "velocities, the batch), from /proc/self/status: activations, gradients and workspace"}


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(kind: str, batch: int, devices: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--memory-probe", kind, "--batch", str(batch),
                             "--devices", ",".join(devices)], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
    return json.loads(result.stdout.strip().splitlines()[-1])


def gpu_sections(batch: int, steps: int, repeats: int) -> dict:
    """Per-tower step, cross-device copies, synthetic vs real input, images/s per GPU (needs CUDA). Every time is
    taken from idle devices to idle devices, all of the model's GPUs."""
    devices = resolve_devices(None, require_two_gpus=False)  # two GPUs, or both towers on the one
    torch.backends.cudnn.benchmark = True
    trainer = TrainingStep(build(SpeedConfig(), devices), SpeedConfig(), batch)
    model = trainer.model
    per_tower = {f"tower {t} on {device}": median_ms(tower_alone(tower, x), [device], steps, repeats)
                 for t, (tower, device, x) in enumerate(zip(model.towers, model.devices, trainer.inputs))}
    copies = exchange_copies(batch, devices) if devices[0] != devices[1] else []
    copies_ms = median_ms(copy_work(copies + mirrored(copies)), devices, steps, repeats) if copies else 0.0
    trainer.step()
    synthetic_s = statistics.median(trainer.seconds(steps) for _ in range(repeats))
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = bench_data.image_folder(Path(tmp))
        (Path(tmp) / "raw").mkdir()
        (Path(tmp) / "raw" / "train").symlink_to(folder.resolve())
        prepare(Path(tmp) / "raw", Path(tmp) / "store", workers=2)
        store = PreparedStore(Path(tmp) / "store")
        split, stats = store.split("train"), store.stats()
        split = split.take(np.resize(np.arange(len(split)), batch * (steps + 1)))
        augment = Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"], devices=model.devices)
        loader = speed.prefetch(batches(split, batch, workers=2, pin_memory=True), model.devices)
        first = True
        for step, (images, labels) in enumerate(loader):
            trainer.inputs, trainer.labels = augment.train(images, step_rng(0, 0, step)), labels
            if first:
                trainer.step()
                sync(model.devices)
                start, first = time.perf_counter(), False
                continue
            trainer.step()
        sync(model.devices)
        loader_s = (time.perf_counter() - start) / step
    rate = batch / synthetic_s
    return {"devices": list(devices), "gpu_names": [torch.cuda.get_device_name(d) for d in distinct(devices)],
            "batch": batch, "tower_step_ms": per_tower, "cross_device_copies_ms_per_step": copies_ms,
            "step_ms_synthetic": 1e3 * synthetic_s, "step_ms_real_loader": 1e3 * loader_s,
            "loader_headroom": loader_s / synthetic_s, "images_per_s_per_gpu": rate / len(distinct(devices)),
            "note": "median of interleaved repeats, every GPU of the model synchronised; loader: the prepared store "
                    "(bench_data's images), 2 workers, pinned memory, prefetch, augmentation on the GPU"}


def estimates(flops_per_image: float) -> dict:
    """The compute floor of 90 epochs per GPU pair and the input rate it implies (arithmetic, not measured)."""
    total = flops_per_image * IMAGENET_TRAIN * EPOCHS
    rows = {}
    for gpu, (bf16, fp32, source) in GPU_PEAKS.items():
        row = {"peak_tflops_bf16": bf16, "peak_tflops_fp32": fp32, "source": source}
        for label, peak in (("bf16", bf16), ("fp32", fp32)):
            for mfu in (1.0, 0.3):
                seconds = total / (2 * peak * 1e12 * mfu)
                row[f"hours_{label}_{int(mfu * 100)}pct"] = seconds / 3600
                row[f"input_img_per_s_{label}_{int(mfu * 100)}pct"] = IMAGENET_TRAIN * EPOCHS / seconds
        rows[f"2x {gpu}"] = row
    return {"flops_per_training_image": flops_per_image, "total_flops_90_epochs": total, "gpus": rows}


def config_devices(options: SpeedConfig | None, devices: list[str]) -> list[str]:
    """Where a configuration of TRAIN_CONFIGS runs: the towers on `devices`, or on the first alone when grouped
    (both towers on one device); torchvision's network on the first."""
    return devices if options is not None and not options.grouped else [devices[0]] * 2


def machine(devices: list[str]) -> str:
    """The devices a section ran on, in words: the GPUs' names, or the CPU."""
    if torch.device(devices[0]).type == "cuda":
        return ", ".join(f"{d} {torch.cuda.get_device_name(torch.device(d))}" for d in map(str, distinct(devices)))
    return (f"the CPU ({platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}, "
            f"{torch.backends.cpu.get_cpu_capability()})")


def ratio_per_flop(steps: list[float], flops: float, devices: int, torchvision_steps: list[float],
                   torchvision_flops: float) -> list[float]:
    """A network's achieved FLOP/s per device over torchvision's (one device), repeat by repeat: each ratio from
    the two step times of one repeat (the same batch)."""
    return [(flops / step / devices) / (torchvision_flops / theirs) for step, theirs in zip(steps, torchvision_steps)]


def measure(args) -> dict:
    devices = resolve_devices(None, require_two_gpus=False)  # two GPUs, both towers on the one, or the CPU
    use_devices(devices)
    gpu = torch.device(devices[0]).type == "cuda"
    batch = args.batch or (GPU_BATCH if gpu else CPU_BATCH)
    speed.set_cudnn_benchmark(None, deterministic=False)  # as training: cuDNN picks its algorithms
    load_before = os.getloadavg()
    flops = {"two-tower": training_flops_per_image(SpeedConfig()), "torchvision": training_flops_per_image(None),
             "two-tower, LRN window sums included": training_flops_per_image(SpeedConfig(), lrn=True)}
    n = 256 if args.quick else 8192 if gpu else 2048
    peaks = {"fp32": matmul_peak(torch.float32, n, args.repeats + 2, devices[0])}
    peaks["bf16"] = matmul_peak(torch.bfloat16, n, args.repeats + 2, devices[0])
    quick_skips = ("channels_last", "bf16", "compile")  # a smoke run times the default, grouped and torchvision nets
    configs = {k: v for k, v in TRAIN_CONFIGS.items() if not (args.quick and any(w in k for w in quick_skips))}
    where = {label: config_devices(options, devices) for label, options in configs.items()}
    used = {label: len(distinct(where[label])) for label in configs}
    trainers = {label: TrainingStep(build(options, where[label]), options, batch) for label, options in configs.items()}
    for trainer in trainers.values():
        for _ in range(2 if gpu else 1):
            trainer.step()  # warm-up (compilation; on GPUs cuDNN's autotuning)
    times, loads = {label: [] for label in trainers}, []
    for repeat in range(args.repeats):
        # Interleaved, so that a change in the machine's load hits every network alike; every other repeat in the
        # opposite order, so that no network always follows the same one.
        loads.append(os.getloadavg()[0])
        for label in (list(trainers) if repeat % 2 == 0 else reversed(list(trainers))):
            times[label].append(trainers[label].seconds(args.steps))
    loads.append(os.getloadavg()[0])
    training = {}
    for label, options in configs.items():
        rate = batch / statistics.median(times[label])
        per_image = flops["torchvision" if options is None else "two-tower"]
        precision = "bf16" if options is not None and speed.autocast_name(options) else "fp32"
        peak = peaks[precision] * used[label]
        training[label] = {"devices": [str(d) for d in distinct(where[label])], "images_per_s": rate,
                           "flops_per_image": per_image, "achieved_flops": rate * per_image, "peak": precision,
                           "fraction_of_peak": rate * per_image / peak, "step_s_repeats": times[label]}
    del trainers
    ratios = {key: ratio_per_flop(times[label], flops["two-tower"], used[label], times["torchvision alexnet"],
                                  flops["torchvision"])
              for key, label in (("default", "two-tower, tower by tower (the default)"),
                                 ("grouped", "two-tower, grouped"))}
    eval_batch = 2 if args.quick else GPU_BATCH if gpu else 16
    return {
        "machine": machine(devices), "devices": devices,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]], "load_average_per_repeat": loads,
        "precision": speed.precision(),
        "batch": batch, "steps_per_repeat": args.steps, "repeats": args.repeats, "flops_per_image": flops,
        "matmul_peak_flops": peaks, "matmul_n": n, "matmul_device": devices[0],
        "training": training,
        "per_flop_vs_torchvision": statistics.median(ratios["default"]),
        "per_flop_vs_torchvision_repeats": ratios["default"],
        "grouped_per_flop_vs_torchvision": statistics.median(ratios["grouped"]),
        "grouped_per_flop_vs_torchvision_repeats": ratios["grouped"],
        "ten_patch_images_per_s": ten_patch_rate(eval_batch, args.repeats, devices), "ten_patch_batch": eval_batch,
        "memory": {kind: peak_memory(kind, batch, devices) for kind in ("two-tower", "torchvision")},
        "gpu": gpu_sections(batch, args.steps, args.repeats) if gpu else
        {"skipped": "no CUDA device on this machine: the per-tower step, cross-device copies, synthetic vs real "
                    "input and images/s per GPU are measured only on GPUs"},
        "estimates": estimates(flops["two-tower"]),
        "command": "make bench" if not args.quick else "python tools/bench.py --quick",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }


def render_targets(c: dict) -> list[str]:
    """The speed and memory targets against torchvision's alexnet, each with the ratio this run measured."""
    tv = c["training"]["torchvision alexnet"]["achieved_flops"]
    compiled = c["training"].get("two-tower, grouped + torch.compile")
    memory = c["memory"]["two-tower"]["peak_bytes_per_step"] / c["memory"]["torchvision"]["peak_bytes_per_step"]
    rows = [("default path, per FLOP", "at least 0.95x", c["per_flop_vs_torchvision"], 0.95, True),
            ("grouped + torch.compile, per FLOP", "at least 1.0x",
             compiled["achieved_flops"] / tv if compiled else None, 1.0, True),
            ("training-step memory", "at most 1.5x", memory, 1.5, False)]
    spread = {"default path, per FLOP": c.get("per_flop_vs_torchvision_repeats")}
    lines = ["| against torchvision's alexnet | target | measured | met |", "|---|---|---|---|"]
    for name, target, ratio, bound, higher in rows:
        if ratio is None:
            lines.append(f"| {name} | {target} | not measured (--quick) | |")
            continue
        repeats = spread.get(name)
        over = f" (median; {min(repeats):.2f}-{max(repeats):.2f} over the repeats)" if repeats else ""
        met = "yes" if (ratio >= bound if higher else ratio <= bound) else "no"
        lines.append(f"| {name} | {target} | {ratio:.2f}x{over} | {met} |")
    return lines + [""]


def render_per_flop(c: dict) -> str:
    """The headline ratio: the median of the repeats' ratios, with their range and the load they ran under."""
    repeats = c.get("per_flop_vs_torchvision_repeats")
    if not repeats:  # a record from before the ratios per repeat
        return (f"**Per FLOP, the two-tower network (default options) runs at {c['per_flop_vs_torchvision']:.2f}x "
                f"torchvision's speed** (grouped: {c['grouped_per_flop_vs_torchvision']:.2f}x): the ratio of the "
                "median rates of a run from before the bench timed ratios per repeat, so without their spread.")
    grouped = c["grouped_per_flop_vs_torchvision_repeats"]
    loads = c["load_average_per_repeat"]
    return (f"**Per FLOP and per device, the two-tower network (default options) runs at "
            f"{c['per_flop_vs_torchvision']:.2f}x torchvision's speed**: the median of the ratios of the "
            f"{len(repeats)} repeats (each from the two networks' steps in that repeat), "
            f"{min(repeats):.2f}-{max(repeats):.2f} over them, at load average {min(loads):.1f}-{max(loads):.1f} "
            f"(grouped: {c['grouped_per_flop_vs_torchvision']:.2f}x, {min(grouped):.2f}-{max(grouped):.2f}).")


def render_compute(c: dict) -> list[str]:
    g = 1e9
    loads = c.get("load_average_per_repeat")  # absent in a record from before the ratios per repeat
    during = f", {min(loads):.1f}-{max(loads):.1f} during it" if loads else ""
    order = " (every other repeat in the opposite order)" if loads else ""
    lines = ["## Training and evaluation compute (`make bench`)", "",
             f"Measured on {c['machine']} with `{c['command']}` ({c['date']}, torch {c['torch']}); load average "
             f"{c['load_average_before_after'][0]:.1f} before and {c['load_average_before_after'][1]:.1f} after the "
             f"run{during} (above the core count means other work shared the cores). Batch {c['batch']}, random "
             "images and labels, forward + mean cross-entropy + backward + PaperSGD; medians of "
             f"{c['repeats']} interleaved repeats of {c['steps_per_repeat']} steps{order}. float32 is IEEE float32, "
             "as training sets it (TF32 exists on GPUs only): convolutions "
             f"{c['precision']['float32_convolutions']}, matrix products {c['precision']['float32_matmuls']}.", "",
             f"Matrix-multiply peak (n={c['matmul_n']}, measured on {c.get('matmul_device', 'cpu')}): fp32 "
             f"{c['matmul_peak_flops']['fp32'] / g:.0f} GFLOP/s, bf16 {c['matmul_peak_flops']['bf16'] / g:.0f} "
             "GFLOP/s.", "",
             "| network and options | devices | images/s | GFLOP per image (fwd+bwd, counted) | achieved GFLOP/s | "
             "fraction of the matmul peak (per device) |", "|---|---|---|---|---|---|"]
    for label, row in c["training"].items():
        lines.append(f"| {label} | {', '.join(row.get('devices', ['cpu']))} | {row['images_per_s']:.1f} | "
                     f"{row['flops_per_image'] / g:.2f} | {row['achieved_flops'] / g:.0f} | "
                     f"{row['fraction_of_peak']:.2f} of {row['peak']} |")
    lines += ["", f"FLOPs per training image, counted: two-tower {c['flops_per_image']['two-tower'] / g:.2f} G "
              f"({c['flops_per_image']['two-tower, LRN window sums included'] / g:.2f} G with the LRN's window "
              f"sums, left out above), torchvision {c['flops_per_image']['torchvision'] / g:.2f} G; conv1's input "
              "gradient is not computed, so both are a little under 3x the forward FLOPs.", "",
              render_per_flop(c), "",
              *render_targets(c),
              f"10-patch evaluation (measured on {', '.join(c.get('devices', ['cpu', 'cpu']))}, batch "
              f"{c['ten_patch_batch']}, 10 views each): {c['ten_patch_images_per_s']:.1f} images/s.", ""]
    for kind, mem in c["memory"].items():
        per_gpu = ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in mem.get("peak_bytes_per_gpu", {}).items())
        lines.append(f"Peak memory of a batch-{c['batch']} training step, {kind} (measured: {mem['what']}): "
                     f"{mem['peak_bytes_per_step'] / 2**20:.0f} MiB"
                     + (f" above {mem['resting_bytes'] / 2**20:.0f} MiB at rest." if "resting_bytes" in mem else
                        f" ({per_gpu})."))
    lines += ["", "### On GPUs", ""]
    gpu = c["gpu"]
    if "skipped" in gpu:
        lines.append(f"Skipped: {gpu['skipped']}.")
    else:
        lines += [f"Measured on {', '.join(gpu['gpu_names'])} ({gpu['note']}), batch {gpu['batch']}:", "",
                  "| measurement | value |", "|---|---|"]
        lines += [f"| training step of {name} (forward + backward) | {ms:.2f} ms |"
                  for name, ms in gpu["tower_step_ms"].items()]
        lines += [f"| cross-device copies of a step (conv3, fc6, fc7, fc8 inputs and their gradients: 14) | "
                  f"{gpu['cross_device_copies_ms_per_step']:.2f} ms |",
                  f"| step, synthetic data on the GPU | {gpu['step_ms_synthetic']:.2f} ms |",
                  f"| step, real loader | {gpu['step_ms_real_loader']:.2f} ms ({gpu['loader_headroom']:.2f}x) |",
                  f"| images/s per GPU | {gpu['images_per_s_per_gpu']:.0f} |"]
    e = c["estimates"]
    lines += ["", "### Estimates for dual-GPU boxes (arithmetic, not measured)", "",
              f"From the counted {e['flops_per_training_image'] / g:.2f} GFLOP per training image (measured count) "
              f"x {IMAGENET_TRAIN:,} images x {EPOCHS} epochs = {e['total_flops_90_epochs']:.2e} FLOP, divided by "
              "two GPUs' published dense peak at 100% and at 30% utilisation (30%: an estimate of what a tuned "
              "AlexNet reaches; its LRN, pooling and dropout are memory-bound). The input rate is what the loader "
              "must then deliver.", "",
              "| GPUs | peak per GPU bf16 / fp32 (TFLOP/s, source) | 90 epochs bf16 at 100% / 30% | fp32 at 30% | "
              "input images/s bf16 at 30% |", "|---|---|---|---|---|"]
    for name, r in e["gpus"].items():
        lines.append(f"| {name} | {r['peak_tflops_bf16']:g} / {r['peak_tflops_fp32']:g} ({r['source']}) | "
                     f"{60 * r['hours_bf16_100pct']:.0f} min / {60 * r['hours_bf16_30pct']:.0f} min | "
                     f"{r['hours_fp32_30pct']:.1f} h | {r['input_img_per_s_bf16_30pct']:,.0f} |")
    lines += ["", "Which option removes which bottleneck (estimated; none measured on a GPU here):", "",
              "| bottleneck | option |", "|---|---|",
              "| fp32 matrix units (bf16 tensor cores are 8-16x faster on these GPUs) | `speed.autocast=bf16` |",
              "| memory-bound ReLU/LRN/pool/dropout and kernel launches | `speed.compile=true` (single-device "
              "regions, so CUDA graphs stay possible) |",
              "| convolution algorithm choice | `speed.cudnn_benchmark` (on unless deterministic) |",
              "| host-to-device copy on the critical path | `speed.prefetch` (pinned memory, side stream) |",
              "| input rate (decode) | the prepared uint8 store + augmentation on the GPU (data section above) |",
              "| one GPU running both towers | `speed.grouped` (fewer, larger kernels; no exchange copies) |",
              "| cross-device copies | P2P/NVLink; each exchange's copies are queued together, so the towers should "
              "compute at once between exchanges (not yet measured on GPUs; docs/speed.md#on-two-gpus) |", ""]
    return lines


def render(all_results: dict) -> str:
    lines = ["# Benchmarks", "", "Written by `make bench` (`make bench-data` writes the data section alone); each "
             "section comes from one run on the machine it names, side by side, so compare ratios rather than "
             "absolute speeds.", ""]
    if "data" in all_results:
        lines += bench_data.render(all_results)
    if "compute" in all_results:
        lines += render_compute(all_results["compute"])
    if "profile" in all_results:
        lines += ["## Where a training step's time goes, layer by layer (on the CPU)", "",
                  profile_layers.render(all_results["profile"])]
    return "\n".join(lines)


def save(sections: dict, out: Path) -> str:
    """Put each section's results in out/benchmarks.json (keeping the other sections); rewrite the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "benchmarks.json"
    all_results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    all_results.update(sections)
    json_path.write_text(json.dumps(all_results, indent=1) + "\n")
    text = render(all_results)
    (out / "benchmarks.md").write_text(text)
    return text


SECTIONS = ("data", "compute", "profile")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per data throughput measurement")
    parser.add_argument("--batch", type=int, help=f"training batch size, both networks (default: {GPU_BATCH} on "
                        f"GPUs, {CPU_BATCH} on the CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved repeats")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny matrices, three networks")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where benchmarks.{json,md} go")
    parser.add_argument("--memory-probe", choices=("two-tower", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="cpu,cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    speed.set_precision(False)  # IEEE float32, as training sets it (torch's default is TF32 for cuDNN convolutions)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.batch or CPU_BATCH, args.devices.split(","))))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections {args.sections}: choose from {','.join(SECTIONS)}")
    measures = {"data": lambda: bench_data.measure(args.seconds), "compute": lambda: measure(args),
                "profile": lambda: profile_layers.profile(min(args.batch or CPU_BATCH, CPU_BATCH), args.repeats)}
    # in this order (the data section runs on one core, the others on all), then written together
    print(save({section: measures[section]() for section in sections}, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
