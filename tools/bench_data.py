"""The data section of `make bench` (tools/bench.py; `make bench-data` runs it alone): training-input images/s on
one core, this pipeline from the prepared store vs torchvision's standard one on the same real images; prepare
speed with and without Pillow's draft(), how much draft() changes the output, and the store's size per image.

Images: ../shared/data/imagenet-mini/train (101 real ILSVRC originals) when present, else the demo data.
"""

from __future__ import annotations

import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.data import Augment, batches, step_rng
from repro.demo_data import make_demo_data
from repro.prepare import load_256, prepare
from repro.store import PreparedStore

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "imagenet-mini" / "train"


def rate(work, seconds: float) -> float:
    """Images per second of `work()` (which returns how many images it handled), repeated for `seconds`."""
    work()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += work()
    return count / (time.perf_counter() - start)


def image_folder(tmp: Path) -> tuple[Path, str]:
    """A train/<wnid>/ folder of real images, or of the demo data when the real ones are absent."""
    if MINI.is_dir():
        return MINI, "../shared/data/imagenet-mini/train (101 real ILSVRC-2012 training originals)"
    make_demo_data(tmp / "demo", num_classes=10, train_per_class=10, val_per_class=1)
    folder = tmp / "demo_train"
    with tarfile.open(tmp / "demo" / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                inner.extractall(folder / member.name.removesuffix(".tar"), filter="data")
    return folder, "demo data (100 synthetic JPEGs; ../shared/data/imagenet-mini was absent)"


def torchvision_rate(folder: Path, seconds: float) -> float:
    """torchvision's standard ImageNet training input: decode with PIL, RandomResizedCrop, flip, ToTensor,
    Normalize, one image at a time (what each DataLoader worker does)."""
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(folder, transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
    position = iter(range(10**9))

    def work():
        dataset[next(position) % len(dataset)]
        return 1

    return rate(work, seconds)


def store_rate(store_dir: Path, seconds: float, augment_on_cpu: bool, batch_size: int = 128) -> float:
    """This pipeline on one core: uint8 batches from the memory-mapped store (the CPU's whole share when training
    on a GPU, where the crop, flip, colour noise and mean subtraction run); with `augment_on_cpu`, those batched
    tensor ops too, as when training on the CPU."""
    store = PreparedStore(store_dir)
    split, stats = store.split("train"), store.stats()
    split = split.take(np.resize(np.arange(len(split)), 4 * batch_size))  # enough rows for full batches
    augment = Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"])
    epoch = iter(range(10**9))

    def work():
        e, n = next(epoch), 0
        for step, (images, _labels) in enumerate(batches(split, batch_size, epoch=e, workers=0)):
            if augment_on_cpu:
                augment.train(images, step_rng(0, e, step))
            n += len(images)
        return n

    return rate(work, seconds)


def prepare_rates(folder: Path) -> dict:
    """Per-core conversion speed (decode, resize, crop) with and without draft(), and draft()'s effect on the
    output next to the difference between two resize filters (a yardstick for "resize noise")."""
    files = [p.read_bytes() for p in sorted(folder.glob("*/*")) if p.is_file()]
    result = {}
    for draft in (True, False):
        start = time.perf_counter()
        for data in files:
            load_256(data, draft)
        result[f"images_per_s_{'draft' if draft else 'no_draft'}"] = len(files) / (time.perf_counter() - start)
    draft_diff, filter_diff = [], []
    for data in files:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or min(image.size) < 512:
                continue  # draft() only acts when the shorter side is at least twice 256
            rgb = image.convert("RGB")
        exact = load_256(data, draft=False).astype(np.int16)
        draft_diff.append(np.abs(load_256(data, draft=True) - exact).mean())
        w, h = rgb.size
        size = (max(256, round(w * 256 / min(w, h))), max(256, round(h * 256 / min(w, h))))
        bicubic = np.asarray(rgb.resize(size, Image.Resampling.BICUBIC))
        left, top = (size[0] - 256) // 2, (size[1] - 256) // 2
        filter_diff.append(np.abs(bicubic[top:top + 256, left:left + 256] - exact).mean())
    result.update(draft_affected_images=len(draft_diff),
                  draft_mean_abs_diff=float(np.mean(draft_diff)) if draft_diff else None,
                  bilinear_vs_bicubic_mean_abs_diff=float(np.mean(filter_diff)) if filter_diff else None)
    return result


def render(all_results: dict) -> list[str]:
    """The data section of docs/benchmarks.md (tools/bench.py puts the file together)."""
    data = all_results["data"]
    lines = ["## Data pipeline (`make bench-data`)", "",
             f"Machine: {data['machine']}. Images: {data['images']}. One process, one thread (per core).", "",
             "| measurement | value |", "|---|---|",
             f"| torchvision standard input (ImageFolder, PIL decode, RandomResizedCrop, flip, ToTensor, Normalize) "
             f"| {data['torchvision_images_per_s']:.0f} img/s |",
             f"| this pipeline, CPU share when training on a GPU: uint8 batches from the prepared store "
             f"(crop, flip, colour noise and mean run on the GPU) | {data['store_images_per_s']:.0f} img/s |",
             f"| **ratio, per core** | **{data['ratio']:.1f}x** (goal: at least 10x) |",
             f"| this pipeline when training on the CPU: the batches plus crop, flip, colour noise and mean as "
             f"batched tensor ops on the CPU | {data['store_augment_cpu_images_per_s']:.0f} img/s "
             f"({data['store_augment_cpu_images_per_s'] / data['torchvision_images_per_s']:.1f}x) |",
             f"| prepare (decode, resize, crop) with draft() | {data['prepare']['images_per_s_draft']:.1f} img/s |",
             f"| prepare without draft() | {data['prepare']['images_per_s_no_draft']:.1f} img/s |",
             f"| draft() output change, mean abs diff (0-255), over the {data['prepare']['draft_affected_images']} "
             f"images with shorter side >= 512 (draft() leaves smaller ones alone) "
             f"| {data['prepare']['draft_mean_abs_diff']:.2f} |",
             f"| for scale: bilinear vs bicubic resize, mean abs diff | "
             f"{data['prepare']['bilinear_vs_bicubic_mean_abs_diff']:.2f} |",
             f"| store size per image (uint8 256x256x3 + header) | {data['store_bytes_per_image']:,.0f} bytes |",
             "", f"Command: `{data['command']}`.", ""]
    return lines


def measure(seconds: float) -> dict:
    """The data section: the rates above on one core, the store's size per image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            folder, description = image_folder(tmp)
            raw = tmp / "raw"
            raw.mkdir()
            (raw / "train").symlink_to(folder.resolve())
            prepare(raw, tmp / "store", workers=1)
            results = {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} thread, {platform.processor() or 'cpu'}",
                "images": description,
                "torchvision_images_per_s": torchvision_rate(folder, seconds),
                "store_images_per_s": store_rate(tmp / "store", seconds, augment_on_cpu=False),
                "store_augment_cpu_images_per_s": store_rate(tmp / "store", seconds, augment_on_cpu=True),
                "prepare": prepare_rates(folder),
                "store_bytes_per_image": (tmp / "store" / "train" / "images.npy").stat().st_size
                / PreparedStore(tmp / "store").manifest["splits"]["train"]["rows"],
                "command": "make bench-data",
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
            }
    finally:
        torch.set_num_threads(threads)
    results["ratio"] = results["store_images_per_s"] / results["torchvision_images_per_s"]
    return results
