"""The prepared store: the one module that knows its files. `repro.prepare` writes a store through the record
classes below and everything else reads it through `PreparedStore`, which checks what it reads.

A store is a folder:

- `manifest.json`, written last (a folder without it is an unfinished store): the format, the records' format,
  the classes, each split's row count, skipped rows and the sha256 of its small files, the statistics' sha256;
- `stats.npz`: the training split's mean image and RGB eigen-decomposition, computed from the records as served;
- `<split>/labels.npy` (int16, sorted-WNID indices, 0 = n01440764), `<split>/sources.tsv` (where each row came
  from), `<split>/crc32.npy` (uint32, the CRC-32 of each row's record as stored);
- the records, in one of two formats (`manifest["records"]["format"]`, never guessed from file names):
  `raw`: `<split>/images.npy`, uint8 N x 256 x 256 x 3, memory-mapped (exact pixels, 196,608 bytes a row);
  `jpeg`: `<split>/jpegs.bin`, the rows' JPEG files back to back, and `<split>/jpegs.npy`, int64 N x 2, each
  row's (offset, size) in it (size 0: a skipped row), decoded by the reader into the same uint8 pixels.

A split's usable rows are all its rows but the ones the prepare skipped. Stores of format
"repro-prepared-store/1" (raw records, no `records` entry) open as raw stores.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from repro.errors import StoreError

if TYPE_CHECKING:
    import torch
# torch and torchvision are imported where records are read: a prepare's workers writing raw or JPEG records start
# without them (2 s less each)

FORMAT = "repro-prepared-store/2"
READABLE = ("repro-prepared-store/1", FORMAT)  # the formats this version opens
SIZE = 256  # §2: "down-sampled the images to a fixed resolution of 256 x 256"
IMAGE_BYTES = SIZE * SIZE * 3  # 196,608 bytes: a raw row
RECORD_FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 95  # the default: 6.8x smaller than raw, 1.98 grey levels from it on average (docs/data.md)
JPEG_SUBSAMPLING = "4:2:0"  # Pillow's and libjpeg's default; 4:4:4 at quality 95 is only 5.3x smaller than raw
DAMAGED = ("the store is damaged (a disk or memory fault, or an edit since it was prepared): prepare it again, or "
           "copy it again from where it came from")


def records_spec(record_format: str = "raw", quality: int = JPEG_QUALITY) -> dict:
    """A store's `records` manifest entry: how its images are stored."""
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"format must be one of {list(RECORD_FORMATS)}, got {record_format!r}")
    if record_format == "raw":
        return {"format": "raw"}
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"quality must be a whole number from 1 to 100, got {quality!r}")
    return {"format": "jpeg", "quality": quality, "subsampling": JPEG_SUBSAMPLING,
            "encoder": "Pillow (libjpeg-turbo)", "decoder": "torchvision.io.decode_jpeg"}


def usable_rows(split_info: dict) -> np.ndarray:
    """A split's rows minus the ones the prepare skipped (its manifest entry says which)."""
    usable = np.ones(split_info["rows"], bool)
    usable[[s["row"] for s in split_info["skipped"]]] = False
    return np.flatnonzero(usable)


def seeded_subset(count: int, limit: int, seed: int) -> np.ndarray:
    """`limit` distinct positions of 0..count-1, in order, drawn from the seed's own stream for subsets (the same
    subset for a seed whatever else the run draws)."""
    return np.sort(np.random.default_rng([seed, 7]).choice(count, limit, replace=False))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npy_header(path: Path) -> tuple[tuple, np.dtype, bool, int]:
    """The shape, dtype, Fortran order and data offset of the .npy file `path`, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return shape, dtype, fortran, f.tell()


# ----------------------------------------------------------------------------------------------------------------
# Records: one split's images as stored, written by the prepare and read (and checked) by everyone


class Records:
    """One split's records in `folder`. Reading: `read(rows)` gives the rows' pixels as uint8 [n, 256, 256, 3],
    each record checked against its CRC-32 first when `verify`; a damaged record is a StoreError naming `where`
    (the store and the split) and the row, never pixels passed on. The files open on first use, in the process
    that reads (the loader's workers). Writing (`repro.prepare`): `create` in the main process, `put` in each
    conversion worker, `commit` of the workers' results in the main process, `resume` and `finish` there."""

    files: tuple[str, ...] = ()  # the record files, crc32.npy included
    reserved: tuple[str, ...] = ()  # the files `create` makes at their final size (the prepare reserves them)
    checksummed: tuple[str, ...] = ("crc32.npy",)  # the small ones, whose sha256 the manifest records

    def __init__(self, folder: Path, spec: dict, where: str = "", verify: bool = True):
        self.folder, self.spec, self.where, self.verify = Path(folder), spec, where or str(folder), verify
        self._crc = None

    def __getstate__(self) -> dict:  # what a loader worker gets: the description, not the opened files
        return {**self.__dict__, **{key: None for key in self.__dict__ if key.startswith("_")}}

    def close(self) -> None:
        """Let go of the opened files (a process that opens many splits' records in turn)."""
        for key in self.__dict__:
            if key.startswith("_"):
                setattr(self, key, None)

    def error(self, what: str, row: int | None = None) -> StoreError:
        return StoreError(f"{self.where}{'' if row is None else f', row {row:,}'}: {what}")

    @property
    def crc(self) -> np.ndarray:
        if self._crc is None:
            self._crc = np.load(self.folder / "crc32.npy", mmap_mode="r")
        return self._crc

    def check_crc(self, row: int, record) -> None:
        if self.verify and zlib.crc32(record) != self.crc[row]:
            raise self.error(f"its record does not match its CRC-32: {DAMAGED}", row)

    # -- checks at open: shapes, sizes and checksums of the files, nothing read row by row

    def check_array(self, name: str, rows: int, shape: tuple, dtype) -> None:
        """That `name` holds a C-order array of `rows` rows of `shape` and `dtype`, all its bytes present."""
        path = self.folder / name
        if not path.is_file():
            raise self.error(f"{name} is missing: {DAMAGED}")
        try:
            found, found_dtype, fortran, offset = npy_header(path)
        except (ValueError, OSError, EOFError) as error:
            raise self.error(f"{name} is not a NumPy array file ({error}): {DAMAGED}") from None
        if found[:1] != (rows,):
            held = f"{found[0]:,} rows" if found else "no rows"
            raise self.error(f"the manifest counts {rows:,} rows but {name} holds {held} (the manifest or the file "
                             f"was changed): {DAMAGED}", min(rows, found[0]) if found else 0)
        if found[1:] != shape or found_dtype != np.dtype(dtype) or fortran:
            raise self.error(f"{name} holds {found_dtype}{list(found)}, not {np.dtype(dtype)}{[rows, *shape]}: "
                             f"{DAMAGED}")
        row_bytes = math.prod(shape) * np.dtype(dtype).itemsize
        size, needed = path.stat().st_size, offset + rows * row_bytes
        if size < needed:
            raise self.error(f"{name} is truncated ({size:,} bytes of {needed:,}): this row and the ones after it "
                             f"are missing: {DAMAGED}", (size - offset) // row_bytes)
        if size > needed:
            raise self.error(f"{name} is longer than its {rows:,} rows ({size:,} bytes, not {needed:,}): {DAMAGED}")

    def check_sha256(self, name: str, expected: str | None) -> None:
        if expected is not None and sha256(self.folder / name) != expected:
            raise self.error(f"{name} does not match the sha256 the manifest recorded: {DAMAGED}")

    def check(self, info: dict, usable: np.ndarray) -> None:
        """The record files against the split's manifest entry `info` (rows, sha256) and its `usable` rows."""
        self.check_array("crc32.npy", info["rows"], (), np.uint32)
        self.check_sha256("crc32.npy", info.get("sha256", {}).get("crc32.npy"))

    # -- writing

    def create(self, rows: int) -> None:
        np.lib.format.open_memmap(self.folder / "crc32.npy", "w+", np.uint32, (rows,)).flush()

    def put(self, row: int, pixels: np.ndarray):
        """Store one row's pixels (in a conversion worker); returns what `commit` needs of it, if anything."""
        raise NotImplementedError

    def commit(self, results: list[tuple]) -> None:
        """The main process's part of a chunk's (row, error, put's result) triples: before its rows are marked
        done."""

    def resume(self, done: np.ndarray) -> None:
        """Drop what a killed prepare wrote beyond the rows marked `done`."""

    def finish(self, done: np.ndarray) -> dict:
        """The split's manifest entries of the records, once every row is done."""
        return {}


class RawRecords(Records):
    """`images.npy`: uint8 [N, 256, 256, 3], memory-mapped; a row's CRC-32 is that of its 196,608 bytes."""

    files = reserved = ("images.npy", "crc32.npy")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._images = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r")
        return self._images

    def check(self, info: dict, usable: np.ndarray) -> None:
        self.check_array("images.npy", info["rows"], (SIZE, SIZE, 3), np.uint8)
        super().check(info, usable)

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        by_position = np.argsort(rows, kind="stable")  # read the file front to back, then put them back in order
        batch = np.empty((len(rows), SIZE, SIZE, 3), np.uint8)
        batch[by_position] = self.images[rows[by_position]]
        for row, pixels in zip(rows.tolist(), batch):
            self.check_crc(row, pixels)
        return batch

    def create(self, rows: int) -> None:
        np.lib.format.open_memmap(self.folder / "images.npy", "w+", np.uint8, (rows, SIZE, SIZE, 3)).flush()
        super().create(rows)

    def put(self, row: int, pixels: np.ndarray) -> None:
        if self._images is None:  # opened for writing, once per worker
            self._images = np.load(self.folder / "images.npy", mmap_mode="r+")
            self._crc = np.load(self.folder / "crc32.npy", mmap_mode="r+")
        self._images[row] = pixels
        self._crc[row] = zlib.crc32(pixels.tobytes())  # straight into the store: nothing for the main process


class JpegRecords(Records):
    """`jpegs.bin`, each row's JPEG file (quality `spec["quality"]`, 4:2:0) back to back, and `jpegs.npy`, int64
    [N, 2]: each row's (offset, size) in it. Variable sizes, so the conversion workers encode and the main process
    appends each finished chunk and then its index entries, before the rows are marked done: a killed prepare
    leaves at most a partial chunk after the last committed record, which `resume` cuts off."""

    files = ("jpegs.bin", "jpegs.npy", "crc32.npy")
    reserved = checksummed = ("jpegs.npy", "crc32.npy")  # jpegs.bin grows by writes, which meet a full disk as ENOSPC

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index = self._file = None

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
        super().close()

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = np.load(self.folder / "jpegs.npy", mmap_mode="r")
        return self._index

    def check(self, info: dict, usable: np.ndarray) -> None:
        self.check_array("jpegs.npy", info["rows"], (2,), np.int64)
        self.check_sha256("jpegs.npy", info.get("sha256", {}).get("jpegs.npy"))
        path, expected = self.folder / "jpegs.bin", info["bytes"]
        if not path.is_file():
            raise self.error(f"jpegs.bin is missing: {DAMAGED}")
        size = path.stat().st_size
        index = self.index[usable]
        ends = index.sum(axis=1)
        bad = np.flatnonzero((index[:, 1] <= 0) | (index[:, 0] < 0) | (ends > size))
        if len(bad):
            row = int(usable[bad[0]])
            raise self.error(f"its JPEG record (bytes {index[bad[0], 0]:,} to {ends[bad[0]]:,}) is not within "
                             f"jpegs.bin ({size:,} bytes{', truncated' if size < expected else ''}): {DAMAGED}", row)
        if size != expected:
            raise self.error(f"jpegs.bin has {size:,} bytes, the manifest says {expected:,}: {DAMAGED}")
        super().check(info, usable)

    def encoded(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' JPEG records, checked: (their bytes back to back as one uint8 tensor, the sizes, the rows), as
        the loader ships them to be decoded on a GPU (`decode`)."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        if self._file is None:
            self._file = os.open(self.folder / "jpegs.bin", os.O_RDONLY)
        offsets, sizes = self.index[rows].T
        starts = np.concatenate([[0], np.cumsum(sizes)])
        buffer = np.empty(starts[-1], np.uint8)
        for i in np.argsort(offsets, kind="stable"):  # front to back through the file
            record = buffer[starts[i]:starts[i + 1]]
            if os.preadv(self._file, [record], int(offsets[i])) != sizes[i]:
                raise self.error(f"its JPEG record ends past the end of jpegs.bin (truncated): {DAMAGED}",
                                 int(rows[i]))
            self.check_crc(int(rows[i]), record)
        return torch.from_numpy(buffer), torch.from_numpy(sizes.copy()), torch.from_numpy(rows)

    def decode(self, buffer: torch.Tensor, sizes: torch.Tensor, rows: torch.Tensor,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """JPEG records (as `encoded` gives them) decoded as one batch on `device` (a CUDA device: nvJPEG) into
        uint8 [n, 256, 256, 3] there. A record that does not decode to a 256x256 image is a StoreError naming its
        row (torchvision raises for a whole batch without saying which, so a failed batch is decoded again one
        record at a time)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if not len(rows):
            return torch.empty((0, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
        records = list(torch.split(buffer, sizes.tolist()))
        try:
            images = decode_jpeg(records, mode=ImageReadMode.RGB, device=device)
        except torch.cuda.OutOfMemoryError:
            raise  # the GPU's memory, not the record
        except RuntimeError:
            images = None
        if images is None or any(image.shape != (3, SIZE, SIZE) for image in images):
            images = [self.decode_one(record, row, device) for record, row in zip(records, rows.tolist())]
        return torch.stack([image.permute(1, 2, 0) for image in images])

    def decode_one(self, record: torch.Tensor, row: int, device) -> torch.Tensor:
        """One JPEG record decoded on `device`, [3, 256, 256], or a StoreError naming its row."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            (image,) = decode_jpeg([record], mode=ImageReadMode.RGB, device=device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            reason = re.sub(r"^.*\.cpp:\d+, ", "", str(error).strip().splitlines()[-1])  # torch's place
            raise self.error(f"its JPEG record cannot be decoded ({reason}): {DAMAGED}", row) from None
        if image.shape != (3, SIZE, SIZE):
            raise self.error(f"its JPEG record decodes to {list(image.shape)}, not [3, {SIZE}, {SIZE}]: {DAMAGED}",
                             row)
        return image

    def read(self, rows) -> np.ndarray:
        return self.decode(*self.encoded(rows)).numpy()

    def create(self, rows: int) -> None:
        np.lib.format.open_memmap(self.folder / "jpegs.npy", "w+", np.int64, (rows, 2)).flush()
        (self.folder / "jpegs.bin").write_bytes(b"")
        super().create(rows)

    def put(self, row: int, pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=self.spec["quality"], subsampling=JPEG_SUBSAMPLING)
        return buffer.getvalue()

    def commit(self, results: list[tuple]) -> None:
        if self._index is None:
            self._index = np.load(self.folder / "jpegs.npy", mmap_mode="r+")
            self._crc = np.load(self.folder / "crc32.npy", mmap_mode="r+")
        written = [(row, record) for row, error, record in results if error is None]
        with open(self.folder / "jpegs.bin", "ab") as f:  # in the page cache before the index says so: a killed
            offset = f.tell()                              # process loses none of it
            f.write(b"".join(record for _, record in written))
        for row, record in written:
            self._index[row] = (offset, len(record))
            self._crc[row] = zlib.crc32(record)
            offset += len(record)

    def resume(self, done: np.ndarray) -> None:
        index = np.load(self.folder / "jpegs.npy", mmap_mode="r")[done]
        with open(self.folder / "jpegs.bin", "r+b") as f:
            f.truncate(int(index.sum(axis=1).max()) if len(index) else 0)

    def finish(self, done: np.ndarray) -> dict:
        self.resume(done)  # the end of the last record: nothing after it
        index = np.load(self.folder / "jpegs.npy", mmap_mode="r+")
        index[~done] = 0  # a skipped row: none (a try of it before a kill may have left an entry)
        index.flush()
        return {"bytes": (self.folder / "jpegs.bin").stat().st_size}


def open_records(folder: Path, spec: dict, where: str = "", verify: bool = True) -> Records:
    """The records of the split in `folder`, stored as `spec` (a manifest's `records` entry) says."""
    return {"raw": RawRecords, "jpeg": JpegRecords}[spec["format"]](folder, spec, where, verify)


# ----------------------------------------------------------------------------------------------------------------
# A complete store


class PreparedStore:
    """A complete store folder: its manifest, splits and statistics, checked at open against each other and the
    files (nothing read row by row: that is the records' CRC-32s, as they are read, when `verify`)."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            hint = ("its preparation did not finish: run the same prepare command again"
                    if any((self.root / s / "progress.npy").exists() for s in ("train", "val"))
                    else "prepare one with `make prepare-imagenet RAW=... STORE=...`")
            raise StoreError(f"{self.root} is not a complete prepared store (no manifest.json); {hint}")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as error:
            raise StoreError(f"{path} is damaged ({error}); prepare the store again") from None
        check_manifest(path, self.manifest)
        self.classes: list[str] = self.manifest["classes"]
        self.records_spec: dict = self.manifest.get("records", {"format": "raw"})  # format 1: raw only
        self.splits = {name: self.open_split(name, info, verify) for name, info in self.manifest["splits"].items()}
        stats = self.manifest.get("stats")
        if stats is not None:
            if not (self.root / "stats.npz").is_file():
                raise StoreError(f"{self.root / 'stats.npz'} is missing: {DAMAGED}")
            if "sha256" in stats and sha256(self.root / "stats.npz") != stats["sha256"]:
                raise StoreError(f"{self.root / 'stats.npz'} does not match the sha256 the manifest recorded: "
                                 f"{DAMAGED}")

    def open_split(self, name: str, info: dict, verify: bool) -> "Split":
        """A split checked against its manifest entry `info`: its files' shapes, sizes and checksums, its labels
        within the classes."""
        where = f"store {self.root}, split {name}"
        records = open_records(self.root / name, self.records_spec, where, verify)
        records.check_array("labels.npy", info["rows"], (), np.int16)  # first: nothing is sized by `rows` before
        beyond = [entry["row"] for entry in info["skipped"] if entry["row"] >= info["rows"]]
        if beyond:
            raise records.error(f"the manifest skips a row beyond its {info['rows']:,}: {DAMAGED}", beyond[0])
        rows = usable_rows(info)
        records.check(info, rows)
        labels = np.load(self.root / name / "labels.npy").astype(np.int64)
        outside = np.flatnonzero((labels[rows] < 0) | (labels[rows] >= len(self.classes)))
        if len(outside):
            row = int(rows[outside[0]])
            raise records.error(f"label {labels[row]} is not one of the store's {len(self.classes)} classes (0 to "
                                f"{len(self.classes) - 1}): {DAMAGED}", row)
        records.check_sha256("labels.npy", info.get("sha256", {}).get("labels.npy"))
        return Split(records, labels, rows)

    @property
    def record_format(self) -> str:
        return self.records_spec["format"]

    @property
    def description(self) -> str:
        """What the store holds, for reports: the demo's made-up WNIDs all start with n9, real ones never do. A store
        of real WNIDs numbers them among ILSVRC-2012's 1000 classes even when it holds images of a few (class
        folders without a devkit, repro.sources.classes), so the classes with images say whether it is the set."""
        if all(wnid.startswith("n9") for wnid in self.classes):
            return "the demo data"
        with_images = len(np.unique(np.concatenate([split.labels[split.rows] for split in self.splits.values()])))
        return "ILSVRC-2012" if with_images == len(self.classes) == 1000 else f"a {with_images}-class ImageNet subset"

    @property
    def class_names(self) -> list[str]:
        """Each class's devkit `words` ("tench, Tinca tinca") in label order, or its WNID where the store was
        prepared without a devkit (class folders only)."""
        return self.manifest.get("class_names") or list(self.classes)

    def split(self, name: str) -> "Split":
        if name not in self.splits:
            raise StoreError(f"{self.root} has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]

    def stats(self) -> dict[str, np.ndarray]:
        """The training set's mean image (256x256x3) and RGB eigenvalues/eigenvectors (0-255 scale)."""
        path = self.root / "stats.npz"
        if not path.is_file():
            raise StoreError(f"{path} is missing: the statistics come from the training split; prepare it too")
        with np.load(path) as stats:
            return {key: stats[key] for key in stats.files}


def check_manifest(path: Path, manifest) -> None:
    """The manifest's fields that the reader relies on: present, of their types and within their ranges."""

    def bad(key: str, value, expected: str) -> StoreError:
        return StoreError(f"{path}: {key} is {value!r}, not {expected}: the manifest is damaged; prepare the store "
                          "again")

    def whole(value, low: int = 0, high: float = math.inf) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(manifest, dict):
        raise bad("the manifest", type(manifest).__name__, "an object")
    if manifest.get("format") not in READABLE:
        raise StoreError(f"{path}: format {manifest.get('format')!r} is not one this version of repro reads "
                         f"({', '.join(READABLE)}): update repro, or prepare the store again")
    classes = manifest.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("classes", classes, "a list of WNIDs")
    spec = manifest.get("records", {"format": "raw"})
    if not isinstance(spec, dict) or spec.get("format") not in RECORD_FORMATS:
        raise bad("records", spec, f"a record format ({', '.join(RECORD_FORMATS)})")
    if spec["format"] == "jpeg" and not whole(spec.get("quality"), 1, 100):
        raise bad("records.quality", spec.get("quality"), "a JPEG quality from 1 to 100")
    splits = manifest.get("splits")
    if not (isinstance(splits, dict) and splits):
        raise bad("splits", splits, "an object of splits")
    for name, info in splits.items():
        if not isinstance(info, dict):
            raise bad(f"splits.{name}", info, "an object")
        if not whole(info.get("rows")):
            raise bad(f"splits.{name}.rows", info.get("rows"), "a row count")
        skipped = info.get("skipped")
        if not isinstance(skipped, list):
            raise bad(f"splits.{name}.skipped", skipped, "a list")
        for entry in skipped:
            if not (isinstance(entry, dict) and whole(entry.get("row"))):
                raise bad(f"splits.{name}.skipped", entry, "a row")
        if spec["format"] == "jpeg" and not whole(info.get("bytes")):
            raise bad(f"splits.{name}.bytes", info.get("bytes"), "the size of jpegs.bin")


class Split:
    """Some rows of one split of a store: its usable rows, or a part of them. The methods that restrict a split
    return a new one."""

    def __init__(self, records: Records, labels: np.ndarray, rows: np.ndarray):
        self.records, self.labels, self.rows = records, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions) -> "Split":
        """The rows at `positions` (indices into this split's rows, in that order; repeats allowed)."""
        return Split(self.records, self.labels, self.rows[np.asarray(positions, dtype=np.int64)])

    def sample(self, limit: int | None, seed: int) -> "Split":
        """A seeded random `limit` of the rows, in row order (all of them when `limit` is None or larger)."""
        if limit is None or limit >= len(self):
            return self
        return Split(self.records, self.labels, np.sort(self.rows[seeded_subset(len(self), limit, seed)]))

    def part(self, index: int, parts: int) -> "Split":
        """Contiguous share `index` of `parts` of the rows (one rank's share of the validation images)."""
        return Split(self.records, self.labels, np.array_split(self.rows, parts)[index])

    def centre_crops(self, positions, size: int) -> np.ndarray:
        """The central `size` x `size` crops, uint8 [N, size, size, 3], of the images at `positions`."""
        start = (SIZE - size) // 2
        return self.records.read(self.rows[positions])[:, start:start + size, start:start + size]
