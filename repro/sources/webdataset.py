"""timm's WebDataset shards of ILSVRC-2012 (huggingface.co/datasets/timm/imagenet-1k-wds):
`imagenet1k-train-{0000..1023}.tar` and `imagenet1k-validation-{00..63}.tar`, uncompressed tars in which each
image is three members sharing one key: `<key>.jpg`, `<key>.cls` (the label, an integer as text) and `<key>.json`.
timm's reader (timm/data/readers/reader_wds.py) takes the label from `.cls`, the shard list from `_info.json`
when there is one, and the original file name from the key + ".JPEG", so the keys are the original names
(n01440764_10026, ILSVRC2012_val_00000001). The shards are read in place by byte range.

The `.cls` integers are checked against the WNID that starts every training key; the validation keys carry none,
so their integers are trusted only when the training shards were checked alongside them.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from repro.errors import PrepareError
from repro.sources.classes import classes_of
from repro.sources.common import WNID, Found, Source, check_whole, numbered, relative

SHARD = re.compile(r"imagenet1k-(train|validation)-(\d+)\.tar$")
SHARDS = {"train": 1024, "validation": 64}  # the dataset card's imagenet1k-train-{0000..1023}, -validation-{00..63}
INFO = "_info.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # timm's input_key 'jpg;png;webp'


def signature(raw: Path) -> list[str]:
    return [p.name for p in sorted(raw.iterdir()) if SHARD.match(p.name)]


def list_shard(path: str) -> tuple[str, list[tuple[str, int, int, int]]]:
    """(path, [(key, image offset, image size, .cls label)]) of one shard: one worker's task."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = Path(member.name).name.partition(".")  # webdataset splits at the first dot
                sample = samples.setdefault(key, {})
                if extension.lower() in IMAGE_EXTENSIONS:
                    sample["image"] = (member.offset_data, member.size)
                elif extension == "cls":
                    sample["cls"] = tar.extractfile(member).read().decode().strip()
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as error:
        raise PrepareError(f"{path} is truncated or damaged ({type(error).__name__}: {error}); download it "
                           "again") from None
    rows = []
    for key, sample in samples.items():
        if "image" not in sample or not sample.get("cls", "").lstrip("-").isdigit():
            raise PrepareError(f"{path}: sample {key!r} lacks an image or a .cls integer; download the shard again")
        rows.append((key, *sample["image"], int(sample["cls"])))
    return path, rows


def shards(raw: Path) -> dict[str, list[Path]]:
    """Each split's shards, checked whole against _info.json's list, or the dataset card's counts."""
    found = numbered(raw, SHARD)
    try:
        info = {split: list(entry["filenames"]) for split, entry in
                json.loads((raw / INFO).read_text())["splits"].items()} if (raw / INFO).is_file() else {}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise PrepareError(f"{raw / INFO} is damaged ({type(error).__name__}: {error}); download it again") from None
    whole = {}
    for split, numbers in found.items():
        if split in info:
            missing = [name for name in info[split] if not (raw / name).is_file()]
            if missing:
                raise PrepareError(f"{raw}: {len(missing)} of the {len(info[split])} {split} shards listed in {INFO} "
                                   f"are missing ({', '.join(missing[:5])}): download them")
            whole[split] = [raw / name for name in info[split]]
        else:
            width = len(SHARD.match(numbers[min(numbers)].name).group(2))
            whole[split] = check_whole(numbers, SHARDS[split], f"imagenet1k-{split}-{{:0{width}d}}.tar",
                                       f"{raw}: imagenet1k-{split}-*.tar (no {INFO}: the dataset card's count)")
    return whole


def read(raw: Path, pool_map) -> Found:
    split_shards = shards(raw)
    if "validation" in split_shards and "train" not in split_shards:
        raise PrepareError(f"{raw}: the validation shards' .cls integers can only be checked against the training "
                           "shards (whose keys start with the WNID); put the imagenet1k-train-*.tar shards beside "
                           "them")
    split_of = {str(path): split for split, paths in split_shards.items() for path in paths}
    samples = {"train": [], "validation": []}
    for path, rows in pool_map(list_shard, list(split_of)):  # in any order: each result names its shard
        samples[split_of[path]] += [(path, *row) for row in rows]
    wnids = [key.partition("_")[0] for _, key, *_ in samples["train"]]
    bad = next((key for key, wnid in zip((s[1] for s in samples["train"]), wnids) if not WNID.match(wnid)), None)
    if bad:
        raise PrepareError(f"a training key {bad!r} does not start with a WNID (<wnid>_<n>), so its label cannot be "
                           "checked: this is not timm's imagenet-1k-wds")
    classes, names = classes_of(wnids)
    index = {wnid: i for i, wnid in enumerate(classes)}
    for (path, key, *_, label), wnid in zip(samples["train"], wnids):
        if label != index[wnid]:
            raise PrepareError(f"{path}: {key}.cls says {label} but {key} is {wnid}, class {index[wnid]} in "
                               "sorted-WNID order: the .cls integers follow another order, so they cannot be used")
    for path, key, *_, label in samples["validation"]:
        if not 0 <= label < len(classes):
            raise PrepareError(f"{path}: {key}.cls says {label}, not one of the {len(classes)} classes")
    found = Found("wds", classes, names, files=[relative(Path(p), raw) for p in split_of]
                  + ([INFO] if (raw / INFO).is_file() else []),
                  labels=".cls integers, each training one checked against the WNID starting its key")
    found.add_split("train", "imagenet1k-train-*.tar", [
        Source(f"train/{wnid}/{key}.JPEG", path, offset, size, label)
        for (path, key, offset, size, label), wnid in zip(samples["train"], wnids)])
    found.add_split("val", "imagenet1k-validation-*.tar", [
        Source(f"val/{key}.JPEG", path, offset, size, label) for path, key, offset, size, label in samples["validation"]])
    return found
