"""image-net.org's own layouts: the archives as distributed (`archives`: `ILSVRC2012_img_train.tar`, a tar of
per-class tars; `ILSVRC2012_img_val.tar`; `ILSVRC2012_devkit_t12.tar.gz`), and extracted folders (`folders`:
`train/<wnid>/*.JPEG`; `val/` flat with the devkit, or `val/<wnid>/`). The two mix (e.g. the train archive and an
extracted val/). Images are read straight out of the uncompressed tars by byte range, so nothing is extracted. The
devkit's ILSVRC2012_IDs are converted to sorted-WNID labels through its own meta.mat.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

from repro.errors import PrepareError
from repro.sources.classes import classes_of, label_of
from repro.sources.common import VAL_NAME, WNID, Found, Source, folder_files, log, relative, tar_files

TRAIN_TAR, VAL_TAR, DEVKIT_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"


def archives_signature(raw: Path) -> list[str]:
    return [name for name in (TRAIN_TAR, VAL_TAR) if (raw / name).is_file()]


def folders_signature(raw: Path) -> list[str]:
    return [f"{name}/" for name in ("train", "val") if (raw / name).is_dir()]


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


def find_devkit(raw: Path) -> Path | None:
    for candidate in (raw / DEVKIT_TAR, raw / "ILSVRC2012_devkit_t12"):
        if candidate.exists():
            return candidate
    return None


def train_sources(raw: Path, kinds: set[str], class_index: dict[str, int], listed_in: str,
                  skip_bad: bool) -> tuple[str, list[Source], list]:
    """Every training image labelled through `class_index`, and the class archives left out (not a tar, or no
    images in it), which are an error unless `skip_bad`."""
    sources, unusable = [], []
    if "archives" in kinds and (raw / TRAIN_TAR).is_file():
        layout, outer_path = f"{TRAIN_TAR} (tar of per-class tars)", raw / TRAIN_TAR
        try:
            with tarfile.open(outer_path, mode="r:") as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    wnid = Path(member.name).name.removesuffix(".tar")
                    if not member.name.endswith(".tar") or not WNID.match(wnid):
                        raise PrepareError(f"{outer_path}: member {member.name!r} is not a <wnid>.tar class archive")
                    label = label_of(wnid, class_index, f"{outer_path}:{member.name}", "the devkit")
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
    elif "folders" in kinds and (raw / "train").is_dir():
        layout = "train/<wnid>/ folders"
        for folder in sorted(p for p in (raw / "train").iterdir() if p.is_dir()):
            label = label_of(folder.name, class_index, str(folder), listed_in)
            for path, size in folder_files(folder):
                sources.append(Source(f"train/{folder.name}/{path.name}", str(path), 0, size, label))
    else:
        return "absent", [], []
    return layout, sources, unusable


def val_sources(raw: Path, kinds: set[str], class_index: dict[str, int], listed_in: str, devkit: tuple | None):
    """Every validation image. Flat files get their labels from the devkit's ground truth (line i =
    ILSVRC2012_ID of ILSVRC2012_val_i.JPEG), converted to sorted-WNID indices."""
    folders = "folders" in kinds and (raw / "val").is_dir()
    if folders and any(p.is_dir() for p in (raw / "val").iterdir()):
        sources = []
        for folder in sorted(p for p in (raw / "val").iterdir() if p.is_dir()):
            label = label_of(folder.name, class_index, str(folder), listed_in)
            for path, size in folder_files(folder):
                sources.append(Source(f"val/{path.name}", str(path), 0, size, label))
        return "val/<wnid>/ folders", sources
    if "archives" in kinds and (raw / VAL_TAR).is_file():
        layout, files = f"{VAL_TAR} (flat)", [(n, str(raw / VAL_TAR), o, s) for n, o, s in tar_files(raw / VAL_TAR)]
    elif folders:
        layout, files = "val/ flat", [(p.name, str(p), 0, s) for p, s in folder_files(raw / "val")]
    else:
        return "absent", []
    if devkit is None:
        raise PrepareError(f"{raw}: the validation images are flat, so their labels must come from the devkit; "
                           f"put {DEVKIT_TAR} (or its extracted ILSVRC2012_devkit_t12/ folder) in {raw} (Kaggle's "
                           "download: raw= is the folder that holds LOC_val_solution.csv)")
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
    return layout, sources


def read(raw: Path, kinds: set[str], skip_bad: bool) -> Found:
    """The images of `kinds` ("archives", "folders" or both) in `raw`, labelled by sorted WNID."""
    devkit_path = find_devkit(raw)
    if devkit_path is None and "archives" in kinds and (raw / TRAIN_TAR).is_file():
        raise PrepareError(f"{raw} holds {TRAIN_TAR} but no devkit, which lists its classes: put {DEVKIT_TAR} (or "
                           f"its extracted ILSVRC2012_devkit_t12/ folder) in {raw}")
    devkit = read_devkit(devkit_path) if devkit_path else None
    if devkit:
        classes, names = sorted(devkit[0].values()), None
    else:  # class folders: ILSVRC-2012's 1000 classes if they are among them (a missing folder shifts no label)
        classes, names = classes_of(p.name for split in ("train", "val") if "folders" in kinds and
                                    (raw / split).is_dir() for p in (raw / split).iterdir() if p.is_dir())
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    listed_in = "the devkit" if devkit else "the class folders"
    val_layout, val = val_sources(raw, kinds, class_index, listed_in, devkit)  # first: quick; it may need the devkit
    train_layout, train, unusable = train_sources(raw, kinds, class_index, listed_in, skip_bad)
    if not train and not val:
        raise PrepareError(f"{raw} holds no ILSVRC-2012 images: expected {TRAIN_TAR} or train/<wnid>/, and/or "
                           f"{VAL_TAR} or val/ (flat, with {DEVKIT_TAR}) or val/<wnid>/")
    signatures = {"archives": archives_signature(raw), "folders": folders_signature(raw)}
    used = [kind for kind in ("archives", "folders") if kind in kinds and signatures[kind]]
    found = Found("+".join(used), classes, [devkit[2][wnid] for wnid in classes] if devkit else names,
                  files=[file for kind in used for file in signatures[kind]]
                  + ([relative(devkit_path, raw)] if devkit_path else []),
                  labels="WNIDs of the class archives or folders; flat validation images: the devkit's ground truth "
                  "(ILSVRC2012_IDs, converted through its meta.mat)" if devkit else "WNIDs of the class folders",
                  devkit=str(devkit_path) if devkit_path else None)
    found.add_split("train", train_layout, train, unusable)
    found.add_split("val", val_layout, val)
    return found
