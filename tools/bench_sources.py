"""What each input layout of `repro-prepare` costs per image on one core, side by side in one run (docs/data.md):

- index: finding and checking every image and its label (repro.sources.plan, one process);
- read: the image's bytes, read as the conversion reads them (repro.sources.chunks and Reader; .tar.gz shards
  are read through by the main process for all workers);
- convert: read + decode + resize + crop (load_256 with draft(), what a worker does per image).

Images: the real ILSVRC-2012 originals of ../shared/data/imagenet-mini (101 training, 200 validation) written in
every layout by the tests' writers (tests/layouts.py), or the demo data when those are absent. Each layout is timed
`--rounds` times, the layouts taking turns; the median round is reported.

    .venv/bin/python tools/bench_sources.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the layout writers are the tests' helpers

from layouts import WRITERS, demo_images, write_archives  # noqa: E402
from repro.demo_data import make_demo_data  # noqa: E402
from repro.prepare import load_256  # noqa: E402
from repro.sources import Reader, chunks, plan  # noqa: E402
from repro.sources.classes import ilsvrc2012  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def real_images() -> tuple[dict, dict[str, int]] | None:
    """imagenet-mini's images with their labels, and the devkit's IDs, or None when they are absent."""
    mini, meta = SHARED / "imagenet-mini", SHARED / "imagenet-meta"
    if not (mini.is_dir() and meta.is_dir()):
        return None
    rows = list(csv.DictReader(open(meta / "classes.csv")))
    ids = {r["wnid"]: int(r["ilsvrc2012_id"]) for r in rows}
    id_to_label = {int(r["ilsvrc2012_id"]): int(r["sorted_index"]) for r in rows}
    truth = (meta / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    wnids, words = ilsvrc2012()
    images = {"wnids": list(wnids), "words": list(words),
              "train": [(p.parent.name, p.name, p.read_bytes()) for p in sorted((mini / "train").glob("*/*.JPEG"))],
              "val": [(p.name, id_to_label[int(truth[int(p.name[15:23]) - 1])], p.read_bytes())
                      for p in sorted((mini / "val").glob("*.JPEG"))]}
    return images, ids


def timings(raw: Path) -> dict[str, float]:
    """Seconds per image of indexing, reading and converting everything in `raw`."""
    start = time.perf_counter()
    work = plan(raw, skip_bad=True)
    indexed = time.perf_counter()
    rows = [(row, s) for info in work["splits"].values() for row, s in enumerate(info["sources"])]
    reader, blobs = Reader(), []
    for chunk in chunks(rows, 32):
        blobs += [data if data is not None else reader.read(source) for _, source, data in chunk]
    read = time.perf_counter()
    for data in blobs:
        try:
            load_256(data)
        except OSError:  # the demo's truncated file, as the conversion would skip it
            pass
    converted = time.perf_counter()
    return {"index": (indexed - start) / len(rows), "read": (read - indexed) / len(rows),
            "convert": (converted - indexed) / len(rows), "images": len(rows), "bytes": sum(map(len, blobs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = real_images()
        if real:
            images, ids = real
            layouts = {"archives": write_archives(images, tmp / "archives", ids)}
            what = "the 101 + 200 real ILSVRC-2012 images of ../shared/data/imagenet-mini"
        else:
            make_demo_data(tmp / "archives", num_classes=10, train_per_class=30, val_per_class=10, seed=0)
            images, layouts = demo_images(tmp / "archives"), {"archives": tmp / "archives"}
            what = "the demo data (10 classes, 300 + 100 images)"
        layouts |= {name: write(images, tmp / name) for name, write in WRITERS.items()}
        results = {name: [] for name in layouts}
        for round_ in range(args.rounds):
            names = list(layouts)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                results[name].append(timings(layouts[name]))
    print(f"Per image on one core, {what}; median of {args.rounds} rounds:\n")
    print("| layout | index (ms) | read (ms) | read + decode + resize (ms) | images/s converting |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in ("index", "read", "convert")}
        print(f"| {name} | {median['index'] * 1e3:.3f} | {median['read'] * 1e3:.3f} | {median['convert'] * 1e3:.2f} "
              f"| {1 / median['convert']:.0f} |")
    tar = results["hf_tar"]
    megabytes = statistics.median(run["bytes"] / run["read"] / run["images"] for run in tar) / 1e6
    print(f"\nThe main process reads the tar.gz shards at {megabytes:.0f} MB/s of images (decompressing included).")


if __name__ == "__main__":
    main()
