"""Kaggle's "ImageNet Object Localization Challenge" download (kaggle.com/c/imagenet-object-localization-challenge),
extracted: `ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, a flat `ILSVRC/Data/CLS-LOC/val/`, `LOC_synset_mapping.txt`
(one class a line: "<wnid> <words>") and `LOC_val_solution.csv` (ImageId,PredictionString: the boxes of each
validation image, "<wnid> x_min y_min x_max y_max" each). The labels are WNID strings, converted to sorted-WNID
indices; the classes are the mapping file's, and every WNID met must be one of them. The unlabelled test/ folder
is not read.
"""

from __future__ import annotations

import csv
from pathlib import Path

from repro.errors import PrepareError
from repro.sources.classes import ilsvrc2012, label_of
from repro.sources.common import VAL_NAME, WNID, Found, Source, folder_files, log

MAPPING, VAL_SOLUTION, IMAGES = "LOC_synset_mapping.txt", "LOC_val_solution.csv", Path("ILSVRC/Data/CLS-LOC")
ZIP = "imagenet-object-localization-challenge.zip"


def signature(raw: Path) -> list[str]:
    return [name for name in (MAPPING, VAL_SOLUTION, f"{IMAGES}/") if (raw / name).exists()]


def read_mapping(path: Path) -> tuple[list[str], list[str]]:
    """The mapping file's WNIDs, sorted, with their words."""
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        wnid, _, words = line.partition(" ")
        if not WNID.match(wnid) or wnid in entries:
            raise PrepareError(f"{path}, line {number}: {line[:60]!r} is not '<wnid> <words>' with a new WNID; the "
                               "file is damaged: download it again")
        entries[wnid] = words
    known, _ = ilsvrc2012()
    if set(entries) & set(known) and set(entries) != set(known):
        raise PrepareError(f"{path} lists {len(entries)} classes, not ILSVRC-2012's 1000: download it again")
    wnids = sorted(entries)
    return wnids, [entries[wnid] for wnid in wnids]


def val_labels(path: Path, index: dict[str, int]) -> dict[str, int]:
    """ImageId -> label: the WNID of the image's boxes (all of one class in ILSVRC-2012's validation set)."""
    labels = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        if next(rows, None) != ["ImageId", "PredictionString"]:
            raise PrepareError(f"{path} does not start with the header ImageId,PredictionString: download it again")
        for number, row in enumerate(rows, start=2):
            tokens = row[1].split() if len(row) == 2 else []
            wnids = set(tokens[::5])
            if not tokens or len(tokens) % 5 or len(wnids) != 1:
                raise PrepareError(f"{path}, line {number}: {','.join(row)[:80]!r} is not one class's boxes "
                                   "('<wnid> x_min y_min x_max y_max' ...): download it again")
            labels[row[0]] = label_of(wnids.pop(), index, f"{path}, line {number}", MAPPING)
    return labels


def read(raw: Path) -> Found:
    images = raw / IMAGES
    if not (raw / MAPPING).is_file():
        raise PrepareError(f"{raw} has no {MAPPING}, which lists Kaggle's classes; it comes with the download")
    classes, names = read_mapping(raw / MAPPING)
    index = {wnid: i for i, wnid in enumerate(classes)}
    found = Found("kaggle", classes, names, files=[MAPPING], labels=f"WNIDs (train/<wnid>/ folders; "
                  f"{VAL_SOLUTION}'s boxes) in {MAPPING}'s classes")
    if (images / "train").is_dir():
        train = []
        for folder in sorted(p for p in (images / "train").iterdir() if p.is_dir()):
            label = label_of(folder.name, index, str(folder), MAPPING)
            train += [Source(f"train/{folder.name}/{path.name}", str(path), 0, size, label)
                      for path, size in folder_files(folder)]
        found.add_split("train", f"{IMAGES}/train/<wnid>/ folders", train)
        found.files.append(f"{IMAGES}/train/")
    if (images / "val").is_dir():
        if not (raw / VAL_SOLUTION).is_file():
            raise PrepareError(f"{images / 'val'} has no labels: {VAL_SOLUTION} is missing from {raw}; it comes with "
                               "Kaggle's download")
        labels = val_labels(raw / VAL_SOLUTION, index)
        val = []
        for path, size in folder_files(images / "val"):
            if not VAL_NAME.match(path.name):
                raise PrepareError(f"{path}: not named ILSVRC2012_val_NNNNNNNN.JPEG")
            if path.stem not in labels:
                raise PrepareError(f"{path}: {VAL_SOLUTION} has no line for {path.stem}: download it again")
            val.append(Source(f"val/{path.name}", str(path), 0, size, labels.pop(path.stem)))
        if labels:
            raise PrepareError(f"{images / 'val'}: {len(labels)} image(s) listed in {VAL_SOLUTION} are missing (e.g. "
                               f"{next(iter(labels))}.JPEG): the download is incomplete")
        found.add_split("val", f"{IMAGES}/val/ flat with {VAL_SOLUTION}", val)
        found.files += [f"{IMAGES}/val/", VAL_SOLUTION]
    if (images / "test").is_dir():
        if "val" not in found.splits:
            raise PrepareError(f"{images / 'test'} is the test split, which has no labels; the validation images are "
                               f"{images / 'val'} (with {VAL_SOLUTION}), and they are missing")
        log.info(f"{images / 'test'}: the test split has no labels; not read")
    if not found.splits:
        raise PrepareError(f"{images} holds no train/ or val/ images: the Kaggle download is incomplete")
    return found
