"""The raw input of a preparation, read side: where ILSVRC-2012's images and labels are, in whichever layout the user
has, and their bytes. `repro.prepare` converts what `plan` lists into a store.

Layouts: the archives as ImageNet distributes them (`ILSVRC2012_img_train.tar`, a tar of per-class tars;
`ILSVRC2012_img_val.tar`; `ILSVRC2012_devkit_t12.tar.gz`), or extracted folders (`train/<wnid>/*.JPEG`; `val/`
flat with the devkit, or `val/<wnid>/`). Images are read straight out of the (uncompressed) tars by byte range,
so nothing is extracted. Labels are sorted-WNID indices (0 = n01440764) whatever the input's own convention.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from repro.errors import PrepareError

TRAIN_TAR, VAL_TAR, DEVKIT_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
WNID = re.compile(r"n\d{8}$")
log = logging.getLogger("repro")


@dataclass(frozen=True, slots=True)
class Source:
    """Where one image's bytes are: `size` bytes at `offset` in `path` (a file, or a tar read by byte range)."""

    name: str
    path: str
    offset: int
    size: int
    label: int


def read_devkit(path: Path) -> tuple[dict[int, str], list[int], dict[str, str]]:
    """The devkit's ILSVRC2012_ID -> WNID map for the 1000 leaf classes, the validation ground truth (IDs), and
    each class's `words` (WNID -> e.g. "tench, Tinca tinca")."""
    import scipy.io

    def parse(meta_mat: bytes, ground_truth: str):
        synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        # fields: ILSVRC2012_ID, WNID, words, gloss, num_children, ...; the classes are the leaves
        leaves = [s for s in synsets if int(s[4]) == 0]
        id_to_wnid = {int(s[0]): str(s[1]) for s in leaves}
        return id_to_wnid, [int(line) for line in ground_truth.split()], {str(s[1]): str(s[2]) for s in leaves}

    meta, truth = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
    if path.is_dir():
        root = path / "ILSVRC2012_devkit_t12" if (path / "ILSVRC2012_devkit_t12").is_dir() else path
        for needed in (meta, truth):
            if not (root / needed).is_file():
                raise PrepareError(f"devkit folder {root} has no {needed}")
        files = (root / meta).read_bytes(), (root / truth).read_bytes()
    else:
        try:
            with tarfile.open(path) as tar:
                members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
                for needed in (meta, truth):
                    if needed not in members:
                        raise PrepareError(f"devkit archive {path} has no ILSVRC2012_devkit_t12/{needed}")
                files = tar.extractfile(members[meta]).read(), tar.extractfile(members[truth]).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise PrepareError(f"devkit archive {path} is damaged ({type(error).__name__}: {error}); download "
                               f"{DEVKIT_TAR} again") from None
    try:
        return parse(files[0], files[1].decode())
    except Exception as error:  # scipy's, numpy's or int()'s complaint about damaged contents
        raise PrepareError(f"devkit {path}: {meta} or the ground truth could not be read ({type(error).__name__}: "
                           f"{error}); the devkit is damaged: download {DEVKIT_TAR} again") from None


def tar_files(path: Path, fileobj=None, base: int = 0):
    """(name, absolute byte offset, size) of every regular file in an uncompressed tar."""
    with tarfile.open(name=None if fileobj else path, fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, base + member.offset_data, member.size


def folder_files(folder: Path):
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        yield path, path.stat().st_size


def find_devkit(raw: Path) -> Path | None:
    for candidate in (raw / DEVKIT_TAR, raw / "ILSVRC2012_devkit_t12"):
        if candidate.exists():
            return candidate
    return None


def train_sources(raw: Path, class_index: dict[str, int], skip_bad: bool) -> tuple[str, list[Source], list]:
    """Every training image, sorted by WNID then file name, labelled through `class_index`, and the class archives
    left out (not a tar, or no images in it), which are an error unless `skip_bad`."""
    sources, unusable = [], []
    if (raw / TRAIN_TAR).is_file():
        layout, outer_path = f"{TRAIN_TAR} (tar of per-class tars)", raw / TRAIN_TAR
        try:
            with tarfile.open(outer_path, mode="r:") as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    wnid = Path(member.name).name.removesuffix(".tar")
                    if not member.name.endswith(".tar") or not WNID.match(wnid):
                        raise PrepareError(f"{outer_path}: member {member.name!r} is not a <wnid>.tar class archive")
                    label = class_label(wnid, class_index, f"{outer_path}:{member.name}")
                    try:
                        files = list(tar_files(outer_path, outer.extractfile(member), member.offset_data))
                    except tarfile.TarError as error:
                        unusable.append({"file": member.name, "error": f"not a tar archive ({error})"})
                        continue
                    if not files:
                        unusable.append({"file": member.name, "error": "no images in it"})
                    sources += [Source(f"train/{wnid}/{Path(name).name}", str(outer_path), offset, size, label)
                                for name, offset, size in files]
        except tarfile.TarError as error:
            raise PrepareError(f"{outer_path} is damaged ({error}); download it again") from None
        if unusable and not skip_bad:
            listing = "".join(f"\n  {u['file']}: {u['error']}" for u in unusable)
            raise PrepareError(f"{outer_path}: {len(unusable)} class archive(s) cannot be used:{listing}\nDownload "
                               f"{TRAIN_TAR} again, or add skip_bad=true to leave their images out (the manifest "
                               "records them)")
        for u in unusable:
            log.warning(f"{outer_path}: left out {u['file']}: {u['error']} (skip_bad=true)")
    elif (raw / "train").is_dir():
        layout = "train/<wnid>/ folders"
        for folder in sorted(p for p in (raw / "train").iterdir() if p.is_dir()):
            label = class_label(folder.name, class_index, str(folder))
            for path, size in folder_files(folder):
                sources.append(Source(f"train/{folder.name}/{path.name}", str(path), 0, size, label))
    else:
        return "absent", [], []
    sources.sort(key=lambda s: s.name)
    return layout, sources, unusable


def val_sources(raw: Path, class_index: dict[str, int], devkit: tuple | None) -> tuple[str, list[Source]]:
    """Every validation image, sorted by file name. Flat files get their labels from the devkit's ground truth
    (line i = ILSVRC2012_ID of ILSVRC2012_val_i.JPEG), converted to sorted-WNID indices."""
    if (raw / "val").is_dir() and any(p.is_dir() for p in (raw / "val").iterdir()):
        sources = []
        for folder in sorted(p for p in (raw / "val").iterdir() if p.is_dir()):
            label = class_label(folder.name, class_index, str(folder))
            for path, size in folder_files(folder):
                sources.append(Source(f"val/{path.name}", str(path), 0, size, label))
        return "val/<wnid>/ folders", sorted(sources, key=lambda s: s.name)
    if (raw / VAL_TAR).is_file():
        layout, files = f"{VAL_TAR} (flat)", [(n, str(raw / VAL_TAR), o, s) for n, o, s in tar_files(raw / VAL_TAR)]
    elif (raw / "val").is_dir():
        layout, files = "val/ flat", [(p.name, str(p), 0, s) for p, s in folder_files(raw / "val")]
    else:
        return "absent", []
    if devkit is None:
        raise PrepareError(f"{raw}: the validation images are flat, so their labels must come from the devkit; "
                           f"put {DEVKIT_TAR} (or its extracted ILSVRC2012_devkit_t12/ folder) in {raw}")
    id_to_wnid, ground_truth, _ = devkit
    sources = []
    for name, path, offset, size in files:
        match = VAL_NAME.search(name)
        if not match:
            raise PrepareError(f"{path}: {name!r} is not named ILSVRC2012_val_NNNNNNNN.JPEG")
        number = int(match.group(1))
        if not 1 <= number <= len(ground_truth):
            raise PrepareError(f"{name}: the devkit ground truth has only {len(ground_truth)} lines")
        wnid = id_to_wnid[ground_truth[number - 1]]
        sources.append(Source(f"val/{Path(name).name}", path, offset, size, class_index[wnid]))
    return layout, sorted(sources, key=lambda s: s.name)


def class_label(wnid: str, class_index: dict[str, int], where: str) -> int:
    if wnid not in class_index:
        raise PrepareError(f"{where}: {wnid!r} is not one of the {len(class_index)} classes of the devkit")
    return class_index[wnid]


def plan(raw: Path, skip_bad: bool = False) -> dict:
    """Find the input, check it, and list every image of every split with its label."""
    if not raw.is_dir():
        raise PrepareError(f"{raw} is not a folder")
    devkit_path = find_devkit(raw)
    if devkit_path is None and (raw / TRAIN_TAR).is_file():
        raise PrepareError(f"{raw} holds {TRAIN_TAR} but no devkit, which lists its classes: put {DEVKIT_TAR} (or "
                           f"its extracted ILSVRC2012_devkit_t12/ folder) in {raw}")
    devkit = read_devkit(devkit_path) if devkit_path else None
    if devkit:
        classes = sorted(devkit[0].values())
    elif (raw / "train").is_dir():
        classes = sorted(p.name for p in (raw / "train").iterdir() if p.is_dir())
    elif (raw / "val").is_dir():
        classes = sorted(p.name for p in (raw / "val").iterdir() if p.is_dir())
    else:
        classes = []
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    val_layout, val = val_sources(raw, class_index, devkit)  # first: quick, and it may need the devkit
    train_layout, train, unusable = train_sources(raw, class_index, skip_bad)
    if not train and not val:
        raise PrepareError(f"{raw} holds no ILSVRC-2012 images: expected {TRAIN_TAR} or train/<wnid>/, and/or "
                           f"{VAL_TAR} or val/ (flat, with {DEVKIT_TAR}) or val/<wnid>/")
    return {"raw": str(raw.resolve()), "devkit": str(devkit_path) if devkit_path else None, "classes": classes,
            "class_names": [devkit[2][wnid] for wnid in classes] if devkit else None,
            "splits": {name: {"layout": layout, "sources": sources, "skipped_archives": archives}
                       for name, layout, sources, archives in (("train", train_layout, train, unusable),
                                                               ("val", val_layout, val, []))
                       if sources}}


class Reader:
    """Reads sources' bytes, keeping each file open for the next source in it (one reader per worker process)."""

    def __init__(self):
        self.files: dict[str, object] = {}

    def read(self, source: Source) -> bytes:
        handle = self.files.get(source.path) or self.files.setdefault(source.path, open(source.path, "rb"))
        handle.seek(source.offset)
        data = handle.read(source.size)
        if not data:
            raise OSError("empty file")
        return data
