"""The Hugging Face dataset ILSVRC/imagenet-1k (huggingface.co/datasets/ILSVRC/imagenet-1k), in either of its two
forms, in `raw` or in its `data/` folder.

`hf_tar`: its original shards, `train_images_0.tar.gz` ... `train_images_4.tar.gz`, `val_images.tar.gz` and
`test_images.tar.gz`, as its loading script imagenet-1k.py lists them. Each member is one image named
`<original file name>_<wnid>.JPEG` (the script takes the label from the text after the last "_"); the test
members carry no WNID. The labels are those WNIDs; gzip cannot be read by byte range, so each shard is indexed by
reading it through once (in parallel, one shard a worker), and read again, in order, while converting.

`hf_parquet`: the parquet shards the Hub serves (`train-NNNNN-of-NNNNN.parquet`, `validation-...`, `test-...`),
with an `image` column (struct of `bytes` and `path`, the member's name as above) and an integer `label` whose
names (the datasets library's ClassLabel) are in each file's schema metadata under "huggingface". The integers are
checked twice before any work: the names against ILSVRC-2012's in sorted-WNID order, and every row's integer
against the WNID in its path. The test rows carry label -1.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from pathlib import Path

from repro.errors import PrepareError
from repro.sources.classes import classes_of, names_are_ilsvrc2012
from repro.sources.common import WNID, Found, Source, check_whole, log, numbered, relative

TRAIN_SHARDS = 5  # train_images_0..4.tar.gz (imagenet-1k.py's _DATA_URL)
TAR_SHARD = re.compile(r"(train|val|test)_images(?:_(\d+))?\.tar\.gz$")
PARQUET_SHARD = re.compile(r"(train|validation|test)-(\d{5})-of-(\d{5})\.parquet$")
PARQUET_EXTRA = "pip install -e '.[parquet]' (pyarrow)"


def folder(raw: Path) -> Path:
    """Where the shards are: `raw`, or its data/ folder (the dataset repository's layout)."""
    return raw / "data" if (raw / "data").is_dir() and not any(
        TAR_SHARD.match(p.name) or PARQUET_SHARD.match(p.name) for p in raw.iterdir()) else raw


def tar_signature(raw: Path) -> list[str]:
    return [relative(p, raw) for p in sorted(folder(raw).iterdir()) if TAR_SHARD.match(p.name)]


def parquet_signature(raw: Path) -> list[str]:
    return [relative(p, raw) for p in sorted(folder(raw).iterdir()) if PARQUET_SHARD.match(p.name)]


def parse_name(member: str, where: str) -> tuple[str, str]:
    """(original file stem, WNID) of a member named <stem>_<wnid>.JPEG, as imagenet-1k.py parses it."""
    stem, _, wnid = Path(member).name.removesuffix(".JPEG").rpartition("_")
    if not (stem and WNID.match(wnid)):
        raise PrepareError(f"{where}: {Path(member).name!r} does not end in _<wnid>.JPEG, so it has no label (the "
                           "test split has none); this is not ILSVRC/imagenet-1k's training or validation data")
    return stem, wnid


def canonical(split: str, stem: str, wnid: str) -> str:
    return f"train/{wnid}/{stem}.JPEG" if split == "train" else f"val/{stem}.JPEG"


# ----------------------------------------------------------------------------------------------------------------
# tar.gz shards


def list_shard(path: str) -> tuple[str, list[tuple[str, int, int]]]:
    """(path, [(member name, offset in the decompressed stream, size)] of its .JPEG members): one worker's task.
    Reads the whole shard, so a truncated download is found here, before any conversion."""
    members = []
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".JPEG"):  # as imagenet-1k.py filters them
                    members.append((member.name, member.offset_data, member.size))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PrepareError(f"{path} is truncated or damaged ({type(error).__name__}: {error}); download it "
                           "again") from None
    return path, members


def read_tar(raw: Path, pool_map) -> Found:
    shards = numbered(folder(raw), re.compile(r"(train)_images_(\d+)\.tar\.gz$")).get("train", {})
    val, test = folder(raw) / "val_images.tar.gz", folder(raw) / "test_images.tar.gz"
    train = check_whole(shards, TRAIN_SHARDS, "train_images_{}.tar.gz", str(folder(raw))) if shards else []
    if test.is_file() and not val.is_file():
        raise PrepareError(f"{test} is the test split, which has no labels; the validation images are "
                           f"val_images.tar.gz, and it is missing from {folder(raw)}")
    if test.is_file():
        log.info(f"{test}: the test split has no labels; not read")
    split_of = {str(p): "train" for p in train} | ({str(val): "val"} if val.is_file() else {})
    named = {split: [] for split in ("train", "val")}
    for path, members in pool_map(list_shard, list(split_of)):  # in any order: each result names its shard
        for name, offset, size in members:
            stem, wnid = parse_name(name, path)
            if split_of[path] == "train" and not stem.startswith(f"{wnid}_"):
                raise PrepareError(f"{path}: {name!r} is a training image of {wnid} not named {wnid}_<n>; this is "
                                   "not ILSVRC/imagenet-1k's training data")
            named[split_of[path]].append((canonical(split_of[path], stem, wnid), wnid, path, offset, size))
    classes, names = classes_of(wnid for split in named.values() for _, wnid, *_ in split)
    index = {wnid: i for i, wnid in enumerate(classes)}
    found = Found("hf_tar", classes, names, files=[relative(Path(p), raw) for p in split_of],
                  labels="the WNID ending each member's name (<file>_<wnid>.JPEG, as imagenet-1k.py reads it)")
    for split, layout in (("train", "train_images_N.tar.gz"), ("val", "val_images.tar.gz")):
        found.add_split(split, layout, [Source(name, path, offset, size, index[wnid])
                                        for name, wnid, path, offset, size in named[split]])
    return found


# ----------------------------------------------------------------------------------------------------------------
# parquet shards


def pyarrow_parquet():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PrepareError(f"reading parquet shards needs pyarrow, which is not installed: {PARQUET_EXTRA}") from None
    return parquet


def label_names(schema, path: Path) -> list[str]:
    """The ClassLabel names the datasets library wrote into the file's schema metadata, after checking the two
    columns this reader uses."""
    import pyarrow as pa

    image, label = (schema.field(name) if name in schema.names else None for name in ("image", "label"))
    if (image is None or label is None or not pa.types.is_integer(label.type) or not pa.types.is_struct(image.type)
            or image.type.get_field_index("bytes") < 0):
        raise PrepareError(f"{path} is not ILSVRC/imagenet-1k's parquet: it needs an image column (struct with "
                           f"bytes) and an integer label column, and has {schema.names}")
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return list(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        raise PrepareError(f"{path} has no ClassLabel names for its label column (schema metadata 'huggingface'), "
                           "so the order of its integers cannot be checked; use the dataset's own parquet files or "
                           "its tar.gz shards") from None


def read_parquet(raw: Path) -> Found:
    parquet = pyarrow_parquet()
    shards = numbered(folder(raw), PARQUET_SHARD)
    if "test" in shards and "validation" not in shards:
        raise PrepareError(f"{folder(raw)}: the test-*.parquet shards have no labels (-1); the validation images are "
                           "validation-*.parquet, and they are missing")
    if "test" in shards:
        log.info(f"{folder(raw)}: the test-*.parquet shards have no labels; not read")
    names, rows = None, {"train": [], "val": []}  # rows: (file, row group, row, label, path in the file)
    files = []
    for split, numbers in shards.items():
        if split == "test":
            continue
        totals = {int(PARQUET_SHARD.match(p.name).group(3)) for p in numbers.values()}
        total = totals.pop() if len(totals) == 1 else 0
        example = f"{split}-{{:05d}}-of-{total:05d}.parquet"
        for path in check_whole(numbers, total, example, f"{folder(raw)}: {split}-*.parquet"):
            files.append(relative(path, raw))
            try:
                handle = parquet.ParquetFile(path)
                file_names = label_names(handle.schema_arrow, path)
                if names is not None and file_names != names:
                    raise PrepareError(f"{path}: its ClassLabel names differ from the other shards': a shard of "
                                       "another data set or version")
                names = file_names
                for group in range(handle.num_row_groups):
                    table = handle.read_row_group(group, columns=["label", "image.path"])
                    labels, paths = table.column("label").to_pylist(), table.column("image").to_pylist()
                    rows["train" if split == "train" else "val"] += [
                        (path, group, row, label, (image or {}).get("path"))
                        for row, (label, image) in enumerate(zip(labels, paths))]
            except (OSError, ValueError) as error:  # pyarrow's ArrowIOError, and ArrowInvalid for a damaged file
                raise PrepareError(f"{path} is truncated or damaged ({error}); download it again") from None
    return parquet_found(raw, names, rows, files)


def parquet_found(raw: Path, names: list[str], rows: dict, files: list[str]) -> Found:
    """Check every row's integer against its path's WNID and the names against ILSVRC-2012's, and name the rows."""
    named = {split: [(row, parse_name(row[4], f"{row[0]}, row group {row[1]}") if row[4] else None)
                     for row in split_rows] for split, split_rows in rows.items()}
    where = f"{files[0]} (ClassLabel names)"
    if names_are_ilsvrc2012(names, where):
        classes, labels = classes_of([])[0], "the integer label, in sorted-WNID order (its ClassLabel names are " \
                                             "ILSVRC-2012's), checked against each image's WNID"
    else:
        wnids = {parsed[1] for split in named.values() for _, parsed in split if parsed}
        if any(parsed is None for split in named.values() for _, parsed in split) or len(wnids) != len(names):
            raise PrepareError(f"{where}: {len(names)} classes that are not ILSVRC-2012's, and image paths that do not "
                               "name one WNID each (<file>_<wnid>.JPEG); this is not ILSVRC/imagenet-1k")
        classes, labels = sorted(wnids), "the integer label, checked against each image's WNID (sorted-WNID order)"
    found = Found("hf_parquet", classes, names, files=files, labels=labels)
    for split, layout in (("train", "train-*.parquet"), ("val", "validation-*.parquet")):
        sources = []
        for (path, group, row, label, member), parsed in named[split]:
            where = f"{path}, row group {group}, row {row}"
            if not 0 <= label < len(classes):
                raise PrepareError(f"{where}: label {label} is not one of the {len(classes)} classes (the test split "
                                   "has -1: it has no labels)")
            if parsed and parsed[1] != classes[label]:
                raise PrepareError(f"{where}: label {label} is {classes[label]} in sorted-WNID order, but the image is "
                                   f"{member}: its integers follow another order, so they cannot be used")
            name = canonical(split, *parsed) if parsed else f"{split}/{Path(path).name}/{group:05d}/{row:05d}"
            sources.append(Source(name, str(path), group, row, label))
        found.add_split(split, layout, sources)
    return found
