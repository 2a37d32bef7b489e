"""The demo set's images written in every layout `repro-prepare` reads, each in its real file layout (names,
members, columns, label conventions as docs/data.md cites them), for tests and tools/bench_sources.py.

`demo_images(demo_raw)` reads the demo's archives with tarfile and its demo_info.json (not with repro.sources,
which these layouts test); each `write_<layout>(images, root)` writes them under `root`. Shards get the images in
a seeded random order, as the published shards are shuffled.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import tarfile
from pathlib import Path

MTIME = 1338508800  # fixed, so the files are the same every time


def demo_images(demo_raw: Path) -> dict:
    """{"wnids", "words", "train": [(wnid, file name, bytes)], "val": [(file name, label, bytes)]} of a demo set."""
    info = json.loads((demo_raw / "demo_info.json").read_text())
    train = []
    with tarfile.open(demo_raw / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                train += [(member.name.removesuffix(".tar"), m.name, inner.extractfile(m).read()) for m in inner]
    with tarfile.open(demo_raw / "ILSVRC2012_img_val.tar") as tar:
        val = [(m.name, label, tar.extractfile(m).read()) for m, label in zip(tar, info["val_labels"])]
    return {"wnids": info["wnids"], "words": info["words"], "train": train, "val": val}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime = len(data), MTIME
    tar.addfile(member, io.BytesIO(data))


def _write_tar(path: Path, files: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (lambda: gzip.GzipFile(path, "wb", mtime=0)) if path.name.endswith(".gz") else (lambda: open(path, "wb"))
    with opener() as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            _add(tar, name, data)


def _deal(items: list, shards: int, seed: int) -> list[list]:
    """`items` shuffled and dealt into `shards` lists."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return [items[i::shards] for i in range(shards)]


def _test_images(images: dict) -> list[tuple[str, bytes]]:
    """A few unlabelled test images (the validation images' bytes under test names)."""
    return [(f"ILSVRC2012_test_{i:08d}.JPEG", data) for i, (_, _, data) in enumerate(images["val"][:3], start=1)]


def write_archives(images: dict, root: Path, devkit_ids: dict[str, int]) -> Path:
    """image-net.org's ILSVRC2012_img_train.tar (a tar of <wnid>.tar), ILSVRC2012_img_val.tar (flat) and the
    devkit (as its extracted ILSVRC2012_devkit_t12/ folder), whose ILSVRC2012_IDs are `devkit_ids`."""
    from devkit import write_devkit

    per_class: dict[str, list] = {}
    for wnid, name, data in images["train"]:
        per_class.setdefault(wnid, []).append((name, data))
    inner = {}
    for wnid, files in per_class.items():
        _write_tar(root / f"{wnid}.tar", files)
        inner[wnid] = (root / f"{wnid}.tar").read_bytes()
        (root / f"{wnid}.tar").unlink()
    _write_tar(root / "ILSVRC2012_img_train.tar", [(f"{wnid}.tar", data) for wnid, data in inner.items()])
    _write_tar(root / "ILSVRC2012_img_val.tar", [(name, data) for name, _, data in images["val"]])
    numbers = {int(name[15:23]): label for name, label, _ in images["val"]}
    truth = [devkit_ids[images["wnids"][numbers[n]]] if n in numbers else 1 for n in range(1, max(numbers) + 1)]
    write_devkit(root / "ILSVRC2012_devkit_t12", {i: wnid for wnid, i in devkit_ids.items()}, truth)
    return root


def write_folders(images: dict, root: Path) -> Path:
    """train/<wnid>/<file> and val/<wnid>/<file> (valprep.sh's layout; no devkit)."""
    for wnid, name, data in images["train"]:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "train" / wnid / name).write_bytes(data)
    for name, label, data in images["val"]:
        (root / "val" / images["wnids"][label]).mkdir(parents=True, exist_ok=True)
        (root / "val" / images["wnids"][label] / name).write_bytes(data)
    return root


def write_kaggle(images: dict, root: Path) -> Path:
    """Kaggle's imagenet-object-localization-challenge, extracted: ILSVRC/Data/CLS-LOC/{train/<wnid>/,val/,test/},
    LOC_synset_mapping.txt, LOC_val_solution.csv (one or two boxes per image, all of its class)."""
    data_dir = root / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, name, data in images["train"]:
        (data_dir / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (data_dir / "train" / wnid / name).write_bytes(data)
    (data_dir / "val").mkdir(parents=True)
    rng = random.Random(0)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, label, data in images["val"]:
            (data_dir / "val" / name).write_bytes(data)
            boxes = [[images["wnids"][label], *sorted(rng.sample(range(300), 2)), *sorted(rng.sample(range(300), 2))]
                     for _ in range(rng.randint(1, 2))]
            writer.writerow([name.removesuffix(".JPEG"), " ".join(str(t) for box in boxes for t in box)])
    (data_dir / "test").mkdir()
    for name, data in _test_images(images):
        (data_dir / "test" / name).write_bytes(data)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(images["wnids"],
                                                                                         images["words"])))
    return root


def write_hf_tar(images: dict, root: Path) -> Path:
    """ILSVRC/imagenet-1k's data/train_images_{0..4}.tar.gz, val_images.tar.gz and test_images.tar.gz, members
    named <original stem>_<wnid>.JPEG (the test ones without a WNID)."""
    for number, part in enumerate(_deal(images["train"], 5, seed=1)):
        _write_tar(root / "data" / f"train_images_{number}.tar.gz",
                   [(f"{name.removesuffix('.JPEG')}_{wnid}.JPEG", data) for wnid, name, data in part])
    _write_tar(root / "data" / "val_images.tar.gz",
               [(f"{name.removesuffix('.JPEG')}_{images['wnids'][label]}.JPEG", data)
                for name, label, data in _deal(images["val"], 1, seed=2)[0]])
    _write_tar(root / "data" / "test_images.tar.gz", _test_images(images))
    return root


def parquet_table(rows: list[tuple[bytes, str | None, int]], names: list[str]):
    """A table as the datasets library writes ILSVRC/imagenet-1k: image {bytes, path}, label (int64), the
    features (ClassLabel names) in the schema metadata under "huggingface"."""
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())], metadata={"huggingface": json.dumps({"info": {"features": features}})})
    return pa.table({"image": [{"bytes": data, "path": path} for data, path, _ in rows],
                     "label": [label for *_, label in rows]}, schema=schema)


def write_hf_parquet(images: dict, root: Path, row_group_size: int = 7) -> Path:
    """ILSVRC/imagenet-1k's data/{train,validation,test}-NNNNN-of-NNNNN.parquet, in row groups."""
    import pyarrow.parquet as pq

    wnids = images["wnids"]
    splits = {"train": [(data, f"{name.removesuffix('.JPEG')}_{wnid}.JPEG", wnids.index(wnid))
                        for wnid, name, data in images["train"]],
              "validation": [(data, f"{name.removesuffix('.JPEG')}_{wnids[label]}.JPEG", label)
                             for name, label, data in images["val"]],
              "test": [(data, name, -1) for name, data in _test_images(images)]}
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        parts = _deal(rows, 2 if split == "train" else 1, seed=3)
        for number, part in enumerate(parts):
            pq.write_table(parquet_table(part, images["words"]),
                           root / "data" / f"{split}-{number:05d}-of-{len(parts):05d}.parquet",
                           row_group_size=row_group_size)
    return root


def write_wds(images: dict, root: Path) -> Path:
    """timm/imagenet-1k-wds: imagenet1k-train-NNNN.tar and imagenet1k-validation-NN.tar of <key>.jpg, <key>.cls and
    <key>.json (key = the original file's stem), with the _info.json timm's reader reads."""
    wnids = images["wnids"]
    samples = {"train": [(name.removesuffix(".JPEG"), wnids.index(wnid), data) for wnid, name, data in images["train"]],
               "validation": [(name.removesuffix(".JPEG"), label, data) for name, label, data in images["val"]]}
    info = {"name": "imagenet-1k", "splits": {}}
    for split, width, count in (("train", 4, 4), ("validation", 2, 2)):
        filenames, lengths = [], []
        for number, part in enumerate(_deal(samples[split], count, seed=4)):
            filenames.append(f"imagenet1k-{split}-{number:0{width}d}.tar")
            lengths.append(len(part))
            _write_tar(root / filenames[-1], [
                member for key, label, data in part for member in (
                    (f"{key}.jpg", data), (f"{key}.cls", str(label).encode()),
                    (f"{key}.json", json.dumps({"filename": f"{key}.JPEG", "label": label}).encode()))])
        info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": filenames,
                                 "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps(info))
    return root


WRITERS = {"folders": write_folders, "kaggle": write_kaggle, "hf_tar": write_hf_tar, "hf_parquet": write_hf_parquet,
           "wds": write_wds}
