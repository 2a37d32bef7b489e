"""The data section of `make bench` (tools/bench.py; `make bench-data` runs it alone): training-input images/s on
one core, this pipeline from a raw and from a JPEG store (decode and batch assembly included), with and without
the records' CRC-32 check, vs torchvision's standard one on the same real images, measured side by side in
interleaved rounds; each record format's bytes per image and, per JPEG quality, its pixels' difference from the raw
store's; prepare speed with and without Pillow's draft(), and how much draft() changes the output.

Images: ../shared/data/imagenet-mini/train (101 real ILSVRC originals) when present, else the demo data.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.data import Augment, batches, step_rng
from repro.demo_data import make_demo_data
from repro.prepare import convert, load_256, prepare
from repro.store import JPEG_QUALITY, PreparedStore

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "imagenet-mini" / "train"
QUALITIES = (90, JPEG_QUALITY)  # JPEG stores measured for size and fidelity; the loader is timed on the default
ROUNDS = 3  # interleaved rounds per rate: each rate is the median of its rounds


def rate(work, seconds: float) -> float:
    """Images per second of `work()` (which returns how many images it handled), repeated for `seconds`."""
    work()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += work()
    return count / (time.perf_counter() - start)


def interleaved(works: dict, seconds: float, rounds: int = ROUNDS) -> dict[str, float]:
    """The median images/s of each of `works` (name -> work, as for `rate`) over `rounds` rounds that take turns,
    `seconds` each in all: a change of the machine's load falls on all of them alike."""
    measured = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            measured[name].append(rate(work, seconds / rounds))
    return {name: statistics.median(values) for name, values in measured.items()}


def image_folder(tmp: Path) -> tuple[Path, str]:
    """A train/<wnid>/ folder of real images, or of the demo data when the real ones are absent."""
    if MINI.is_dir():
        return MINI, "../shared/data/imagenet-mini/train (101 real ILSVRC-2012 training originals)"
    info = make_demo_data(tmp / "demo", num_classes=10, train_per_class=10, val_per_class=2)
    folder = tmp / "demo_train"
    with tarfile.open(tmp / "demo" / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                inner.extractall(folder / member.name.removesuffix(".tar"), filter="data")
    for name in info["truncated"]:  # the demo's one unreadable file, there to test the prepare
        next(folder.glob(f"*/{name}")).unlink()
    return folder, "demo data (99 synthetic JPEGs; ../shared/data/imagenet-mini was absent)"


def torchvision_work(folder: Path):
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

    return work


def store_work(store_dir: Path, augment_on_cpu: bool = False, verify: bool = True, batch_size: int = 128):
    """This pipeline on one core: uint8 batches from the store, JPEG records decoded (the CPU's whole share when
    training on a GPU, where the crop, flip, colour noise and mean subtraction run), each record checked against
    its CRC-32 when `verify`; with `augment_on_cpu`, those batched tensor ops too, as when training on the CPU."""
    store = PreparedStore(store_dir, verify=verify)
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

    return work


def fidelity(raw_store: Path, jpeg_store: Path) -> dict:
    """How far a JPEG store's pixels (decoded as the loader decodes them) are from the raw store's, in grey levels
    (0-255) over every pixel of every training image, and its size."""
    raw, jpeg = (PreparedStore(path).split("train") for path in (raw_store, jpeg_store))
    differences = [np.abs(raw.records.read([row]).astype(np.int16) - jpeg.records.read([row])) for row in raw.rows]
    return {"mean_abs_diff": float(np.mean([d.mean() for d in differences])),
            "max_abs_diff": int(max(d.max() for d in differences)),
            "bytes_per_image": store_bytes(jpeg_store) / len(raw.rows)}


def store_bytes(store_dir: Path) -> int:
    """The bytes of a store's training records (images.npy, or jpegs.bin and its index)."""
    folder = store_dir / "train"
    return sum((folder / name).stat().st_size for name in ("images.npy", "jpegs.bin", "jpegs.npy")
               if (folder / name).is_file())


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
    formats, tv = data["formats"], data["torchvision_images_per_s"]
    jpeg = formats[f"jpeg q{JPEG_QUALITY}"]
    lines = ["## Data pipeline (`make bench-data`)", "",
             f"Machine: {data['machine']}, load average {data['load_average_before_after'][0]:.1f} before and "
             f"{data['load_average_before_after'][1]:.1f} after (2 cores: above 2 means other work shared them). "
             f"Images: {data['images']}. One process, one thread (per core); each rate the median of "
             f"{data['rounds']} interleaved rounds.", "",
             "| measurement | value |", "|---|---|",
             f"| torchvision standard input (ImageFolder, PIL decode, RandomResizedCrop, flip, ToTensor, Normalize) "
             f"| {tv:.0f} img/s |",
             f"| this pipeline, CPU share when training on a GPU: uint8 batches from the raw store, each record's "
             f"CRC-32 checked (crop, flip, colour noise and mean run on the GPU) | {data['store_images_per_s']:.0f} "
             "img/s |",
             f"| **ratio, per core** | **{data['ratio']:.1f}x** (goal: at least 10x) |",
             f"| the same from the JPEG store (quality {JPEG_QUALITY}): decode and batch assembly, CRC-32 checked | "
             f"{jpeg['images_per_s']:.0f} img/s |",
             f"| **JPEG ratio, per core** | **{jpeg['images_per_s'] / tv:.1f}x** (goal: at least 5x) |",
             f"| this pipeline when training on the CPU: the raw batches plus crop, flip, colour noise and mean as "
             f"batched tensor ops on the CPU | {data['store_augment_cpu_images_per_s']:.0f} img/s "
             f"({data['store_augment_cpu_images_per_s'] / tv:.1f}x) |",
             f"| prepare (decode, resize, crop) with draft() | {data['prepare']['images_per_s_draft']:.1f} img/s |",
             f"| prepare without draft() | {data['prepare']['images_per_s_no_draft']:.1f} img/s |",
             f"| draft() output change, mean abs diff (0-255), over the {data['prepare']['draft_affected_images']} "
             f"images with shorter side >= 512 (draft() leaves smaller ones alone) "
             f"| {data['prepare']['draft_mean_abs_diff']:.2f} |",
             f"| for scale: bilinear vs bicubic resize, mean abs diff | "
             f"{data['prepare']['bilinear_vs_bicubic_mean_abs_diff']:.2f} |", "",
             "Each record format (`repro-prepare format=...`, `repro-convert`): its size, its loader's rate with and "
             "without the records' CRC-32 check (`data.verify`), and how far its pixels are from the raw store's "
             "(grey levels, 0-255, over every pixel).", "",
             "| records | bytes per image | vs raw | img/s, CRC-32 checked | img/s, unchecked | CRC-32 cost per image "
             "| pixels vs raw: mean / max abs diff |", "|---|---|---|---|---|---|---|"]
    raw_bytes = formats["raw"]["bytes_per_image"]
    for name, row in formats.items():
        timed = "images_per_s" in row
        lines.append(
            f"| {name} | {row['bytes_per_image']:,.0f} | 1/{raw_bytes / row['bytes_per_image']:.1f} |"
            + (f" {row['images_per_s']:.0f} | {row['images_per_s_unchecked']:.0f} | {row['crc_us_per_image']:.0f} µs "
               f"({row['crc_cost_fraction']:.0%} of the rate) |" if timed else " | | |")
            + (f" {row['mean_abs_diff']:.2f} / {row['max_abs_diff']} |" if "mean_abs_diff" in row else " exact |"))
    lines += ["", f"Targets: the JPEG store at most 1/6 of raw's bytes per image "
              f"({'met' if jpeg['bytes_per_image'] * 6 <= raw_bytes else 'missed'}: "
              f"1/{raw_bytes / jpeg['bytes_per_image']:.1f}); its loader at least 5x torchvision's per core "
              f"({'met' if jpeg['images_per_s'] >= 5 * tv else 'missed'}: {jpeg['images_per_s'] / tv:.1f}x).", "",
              f"Command: `{data['command']}` ({data['date']}, torch {data['torch']}).", ""]
    return lines


def measure(seconds: float) -> dict:
    """The data section: the rates above on one core, interleaved; each record format's size and fidelity."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            folder, description = image_folder(tmp)
            raw, raw_store = tmp / "raw", tmp / "store"
            raw.mkdir()
            (raw / "train").symlink_to(folder.resolve())
            prepare(raw, raw_store, workers=1)
            jpeg_stores = {quality: tmp / f"store-q{quality}" for quality in QUALITIES}
            for quality, path in jpeg_stores.items():
                convert(raw_store, path, "jpeg", quality, workers=1)
            jpeg_store = jpeg_stores[JPEG_QUALITY]
            rates = interleaved({
                "torchvision": torchvision_work(folder),
                "raw": store_work(raw_store), "raw unchecked": store_work(raw_store, verify=False),
                "jpeg": store_work(jpeg_store), "jpeg unchecked": store_work(jpeg_store, verify=False),
                "raw, augmented on the CPU": store_work(raw_store, augment_on_cpu=True)}, 6 * seconds)
            images = PreparedStore(raw_store).manifest["splits"]["train"]["rows"]
            formats = {"raw": {"bytes_per_image": store_bytes(raw_store) / images}}
            formats.update({f"jpeg q{quality}": fidelity(raw_store, path) for quality, path in jpeg_stores.items()})
            for name, key in (("raw", "raw"), (f"jpeg q{JPEG_QUALITY}", "jpeg")):
                checked, unchecked = rates[key], rates[f"{key} unchecked"]
                formats[name].update(images_per_s=checked, images_per_s_unchecked=unchecked,
                                     crc_us_per_image=1e6 * (1 / checked - 1 / unchecked),
                                     crc_cost_fraction=1 - checked / unchecked)
            results = {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} thread, {platform.processor() or 'cpu'}",
                "images": description, "rounds": ROUNDS,
                "torchvision_images_per_s": rates["torchvision"],
                "store_images_per_s": rates["raw"],
                "store_augment_cpu_images_per_s": rates["raw, augmented on the CPU"],
                "formats": formats,
                "prepare": prepare_rates(folder),
                "store_bytes_per_image": formats["raw"]["bytes_per_image"],
                "command": "make bench-data",
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
            }
    finally:
        torch.set_num_threads(threads)
    results["load_average_before_after"] = [load_before, os.getloadavg()[0]]
    results["ratio"] = results["store_images_per_s"] / results["torchvision_images_per_s"]
    return results
