"""What every layout shares: where one image's bytes are (`Source`), what a layout found (`Found`), listing the
files of a tar or a folder, and checking that a set of numbered shards is whole."""

from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from repro.errors import PrepareError

WNID = re.compile(r"n\d{8}$")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
log = logging.getLogger("repro")


@dataclass(frozen=True, slots=True)
class Source:
    """One image: its canonical `name` (train/<wnid>/<file> or val/<file>: the store's rows are sorted by it, so
    the same images give the same store from any layout), its sorted-WNID `label`, and where its bytes are in
    `path`: `size` bytes at byte `offset` (of a file, of an uncompressed tar, or of a .tar.gz shard's decompressed
    stream), or, in a parquet file, row `size` of row group `offset`."""

    name: str
    path: str
    offset: int
    size: int
    label: int


@dataclass
class Found:
    """What one layout found in the raw folder: the classes (WNIDs in label order) and their names, each split's
    images, the input files it read (for the manifest) and how it converted and checked their labels."""

    layout: str
    classes: list[str]
    class_names: list[str] | None
    splits: dict[str, dict] = field(default_factory=dict)  # name: {"layout", "sources", "skipped_archives"}
    files: list[str] = field(default_factory=list)
    labels: str = ""
    devkit: str | None = None

    def add_split(self, name: str, layout: str, sources: list[Source], skipped: list | None = None) -> None:
        """A split's images, sorted by name; one name twice (an image in two shards) is an error."""
        sources = sorted(sources, key=lambda s: s.name)
        twice = next((a for a, b in zip(sources, sources[1:]) if a.name == b.name), None)
        if twice:
            raise PrepareError(f"{twice.path}: {twice.name} is in the input twice (also in "
                               f"{next(s.path for s in sources if s.name == twice.name and s != twice)}); a "
                               "damaged or mixed download: download it again")
        if sources:
            self.splits[name] = {"layout": layout, "sources": sources, "skipped_archives": skipped or []}


def tar_files(path: Path, fileobj=None, base: int = 0):
    """(name, absolute byte offset, size) of every regular file in an uncompressed tar."""
    with tarfile.open(name=None if fileobj else path, fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, base + member.offset_data, member.size


def folder_files(folder: Path):
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        yield path, path.stat().st_size


def numbered(folder: Path, pattern: re.Pattern) -> dict[str, dict[int, Path]]:
    """The files of `folder` whose names match `pattern` (groups: split, number), by split and number."""
    shards: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.match(path.name)
        if match:
            shards.setdefault(match.group(1), {})[int(match.group(2))] = path
    return shards


def check_whole(shards: dict[int, Path], expected: int, example: str, where: str) -> list[Path]:
    """The shards 0..expected-1 in order, or a PrepareError naming the missing ones (a partial download)."""
    missing = [number for number in range(expected) if number not in shards]
    extra = sorted(number for number in shards if number >= expected)
    if missing or extra:
        listing = ", ".join(example.format(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        problem = (f"{len(missing)} of its {expected} shards are missing ({listing})" if missing else
                   f"it has shard(s) numbered {extra} beyond the {expected} the set has")
        raise PrepareError(f"{where}: {problem}; download the missing shards (an incomplete download must not be "
                           "trained on)")
    return [shards[number] for number in range(expected)]


def relative(path: Path, raw: Path) -> str:
    return str(path.relative_to(raw)) if path.is_relative_to(raw) else str(path)
