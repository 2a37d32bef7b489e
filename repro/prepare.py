"""Prepare ILSVRC-2012 once (§2 of the paper): every image's shorter side resized to 256, the central 256x256
crop, RGB uint8, into one memory-mapped array per split, with labels, the source of every row and a manifest;
then the training set's statistics (per-pixel mean image, RGB covariance and its eigen-decomposition, §4.1).

Input, any of: the archives as ImageNet distributes them (`ILSVRC2012_img_train.tar`, a tar of per-class tars;
`ILSVRC2012_img_val.tar`; `ILSVRC2012_devkit_t12.tar.gz`), or extracted folders (`train/<wnid>/*.JPEG`; `val/`
flat with the devkit, or `val/<wnid>/`). Images are read straight out of the (uncompressed) tars by byte range,
so nothing is extracted.

Output (`OUT/`): `<split>/images.npy` (N x 256 x 256 x 3 uint8, memory-mapped), `<split>/labels.npy`
(sorted-WNID indices, 0 = n01440764), `<split>/sources.tsv` (where each row came from), `<split>/crc32.npy`
(a checksum per row), `stats.npz`, and `manifest.json`, written last: a store without a manifest is unfinished.
Killed at any point, the same command continues where it stopped. A prepare locks `OUT/` (`.lock`), checks the
disk space it needs and reserves its arrays' blocks before converting anything (docs/reliability.md).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import platform
import re
import signal
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from repro import __version__
from repro.errors import PrepareError
from repro.io import atomic_write, disk_full, free_space, human, locked, remove_temporaries, write_json
from repro.progress import Progress, progress
from repro.store import FORMAT, SIZE, usable_rows

TRAIN_TAR, VAL_TAR, DEVKIT_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
WNID = re.compile(r"n\d{8}$")
RESIZE = Image.Resampling.BILINEAR  # the paper names none; Pillow's bilinear is antialiased when shrinking
TODO, DONE, BAD = 0, 1, 2  # states of a row in <split>/progress.npy
IMAGE_BYTES = SIZE * SIZE * 3  # 196,608 bytes a row of images.npy
ROW_EXTRA, STORE_EXTRA = 256, 16_000_000  # bytes, generous: a row's label, checksum and line; stats and manifest
log = logging.getLogger("repro")


@dataclass(frozen=True, slots=True)
class Source:
    """Where one image's bytes are: `size` bytes at `offset` in `path` (a file, or a tar read by byte range)."""

    name: str
    path: str
    offset: int
    size: int
    label: int


# ----------------------------------------------------------------------------------------------------------------
# Reading the input


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


# ----------------------------------------------------------------------------------------------------------------
# Converting one image


def load_256(data: bytes, draft: bool = True) -> np.ndarray:
    """Decode any image Pillow reads (PNG under a .JPEG name, CMYK, grayscale included) as RGB, resize its
    shorter side to 256 and take the central 256x256 crop. Raises on truncated or unreadable data."""
    with Image.open(io.BytesIO(data)) as image:
        if draft and image.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale when the result still has a shorter side of at least 256
            image.draft("RGB", (SIZE, SIZE))
        image = image.convert("RGB")  # also forces the full decode, so a truncated file fails here
    width, height = image.size
    scale = SIZE / min(width, height)
    new_size = (max(SIZE, round(width * scale)), max(SIZE, round(height * scale)))
    image = image.resize(new_size, RESIZE)
    left, top = (new_size[0] - SIZE) // 2, (new_size[1] - SIZE) // 2
    return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)))


_worker: dict = {}


def _open_worker(out: str, split: str, draft: bool) -> None:
    _worker.update(images=np.load(Path(out, split, "images.npy"), mmap_mode="r+"),
                   crc=np.load(Path(out, split, "crc32.npy"), mmap_mode="r+"), draft=draft, files={})


def _convert_rows(rows: list[tuple[int, str, int, int]]) -> list[tuple[int, str | None]]:
    """Convert a chunk of rows straight into the store; return (row, error or None) for each."""
    results = []
    for row, path, offset, size in rows:
        try:
            handle = _worker["files"].get(path) or _worker["files"].setdefault(path, open(path, "rb"))
            handle.seek(offset)
            data = handle.read(size)
            if not data:
                raise OSError("empty file")
            pixels = load_256(data, _worker["draft"])
            _worker["images"][row] = pixels
            _worker["crc"][row] = zlib.crc32(pixels.tobytes())
            results.append((row, None))
        except Exception as error:  # any failure of one file is reported with the others at the end
            results.append((row, f"{type(error).__name__}: {error}"))
    return results


# ----------------------------------------------------------------------------------------------------------------
# The store


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_space(out: Path, rows: int) -> None:
    """Refuse to start when the disk of `out` cannot hold `rows` more images and what goes with them."""
    needed, free = rows * (IMAGE_BYTES + ROW_EXTRA) + STORE_EXTRA, free_space(out)
    if needed > free:
        raise PrepareError(f"not enough disk space for the store {out}: it needs {human(needed)} ({rows:,} images of "
                           f"{IMAGE_BYTES:,} bytes, with their labels, checksums and statistics) but {human(free)} is "
                           "free there; free some space or choose another store=")


def reserve(path: Path) -> None:
    """Allocate every block of the array file `path` now. The workers write through memory maps, and a write into a
    sparse file on a full disk kills the process (SIGBUS); into reserved blocks it cannot fail."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as error:
            if disk_full(error):
                raise PrepareError(f"disk full: {path} could not be reserved ({human(free_space(path.parent))} free "
                                   "there); free some space and run the same command again") from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(f"{path}: this file system cannot reserve space ({error.strerror}); keep it from filling up")


def start_split(out: Path, split: str, sources: list[Source]) -> None:
    """Allocate a split's files once, reserving their space; a rerun finds them and checks they were planned from
    the same input."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    table = "".join(f"{s.name}\t{s.path}\t{s.offset}\t{s.size}\n" for s in sources)
    if (folder / "progress.npy").is_file():
        if (folder / "sources.tsv").read_text() != table:
            raise PrepareError(f"{folder} was started from different input files; prepare into a new folder or "
                               f"delete {folder}")
    else:
        atomic_write(folder / "sources.tsv", lambda f: f.write(table.encode()))
        atomic_write(folder / "labels.npy", lambda f: np.save(f, np.array([s.label for s in sources], np.int16)))
        np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (len(sources), SIZE, SIZE, 3)).flush()
        np.lib.format.open_memmap(folder / "crc32.npy", "w+", np.uint32, (len(sources),)).flush()
    for name in ("images.npy", "crc32.npy"):  # again on a rerun: a store started before reserving was sparse
        reserve(folder / name)
    if not (folder / "progress.npy").is_file():  # last: its presence says the files above are complete
        atomic_write(folder / "progress.npy", lambda f: np.save(f, np.zeros(len(sources), np.uint8)))


# The signals that stop a preparation (Ctrl-C, a scheduler's SIGTERM), which a terminal or a scheduler sends to every
# process of the job: repro-prepare handles them (one line: what is kept); its workers leave them to it.
STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _start_worker(initializer, initargs: tuple) -> None:
    """A worker's set-up: the stop signals are the parent's to handle (it stops, and the pool lets each worker
    finish its task; a worker would print a KeyboardInterrupt traceback of its own); then the caller's own."""
    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def parallel(function, tasks: list, workers: int, initializer=None, initargs: tuple = ()):
    """`function` of every task in `workers` processes, yielding the results as they come. A worker's death (the
    kernel's out-of-memory killer, a signal) becomes a PrepareError: ProcessPoolExecutor notices it and fails,
    where multiprocessing.Pool would wait forever for the dead worker's task."""
    executor = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                   (initializer, initargs))
    try:
        for future in as_completed([executor.submit(function, task) for task in tasks]):
            yield future.result()
    except BrokenProcessPool:
        raise PrepareError("a worker process died (killed by the system, e.g. out of memory or a full disk, or by a "
                           "signal); what is done is kept: run the same command again to continue (fewer workers= "
                           "use less memory)") from None
    finally:
        executor.shutdown(cancel_futures=True)


def convert_split(out: Path, split: str, sources: list[Source], workers: int, draft: bool,
                  chunk: int) -> dict[int, str]:
    """Convert every row not yet done, with `workers` processes; returns {row: error} for the files that failed."""
    status = np.load(out / split / "progress.npy", mmap_mode="r+")
    todo = [(row, s.path, s.offset, s.size) for row, s in enumerate(sources) if status[row] != DONE]
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    errors = {}
    with Progress(f"prepare {split}", len(sources), "img", initial=len(sources) - len(todo)) as bar:
        for results in parallel(_convert_rows, chunks, workers, _open_worker, (str(out), split, draft)):
            for row, error in results:
                status[row] = BAD if error else DONE
                if error:
                    errors[row] = error
            status.flush()
            bar.update(len(results))
    return errors


def compute_stats(out: Path, rows: np.ndarray, workers: int, chunk: int = 64) -> dict[str, np.ndarray]:
    """§4.1 statistics of the training rows: the per-pixel mean image (§2) and the 3x3 covariance of RGB pixel
    values on the 0-255 scale, with its eigenvalues (descending) and eigenvectors (columns). Exact: float64 sums
    of integer-valued terms stay exact below 2^53, which 1.28M 256x256 images do not reach."""
    path = str(out / "train" / "images.npy")
    parts = [(path, rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
    image_sum = np.zeros((SIZE, SIZE, 3))
    pixel_sum, outer_sum = np.zeros(3), np.zeros((3, 3))
    for a, b, c in progress(parallel(_partial_sums, parts, workers), "statistics", len(parts), "chunk"):
        image_sum += a
        pixel_sum += b
        outer_sum += c
    pixels = len(rows) * SIZE * SIZE
    mean = pixel_sum / pixels
    cov = outer_sum / pixels - np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    return {"mean_image": image_sum / len(rows), "pixel_mean": mean, "pixel_cov": cov,
            "eigvals": eigvals[order], "eigvecs": eigvecs[:, order], "images": np.array(len(rows))}


def _partial_sums(part):
    path, rows = part
    x = np.load(path, mmap_mode="r")[np.sort(rows)].astype(np.float64)
    flat = x.reshape(-1, 3)
    return x.sum(axis=0), flat.sum(axis=0), flat.T @ flat


def prepare(raw: Path, out: Path, skip_bad: bool = False, workers: int | None = None, draft: bool = True,
            chunk: int = 32) -> dict:
    """Prepare `raw` into `out` (see the module docstring); returns the manifest. Raises PrepareError on bad input,
    and, unless `skip_bad`, after converting everything else, when some files could not be read."""
    workers = workers or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "store preparation"):  # for the whole preparation: a second one into `out` is refused
        if (out / "manifest.json").is_file():
            log.info(f"{out} is already a complete prepared store (manifest.json); nothing to do")
            return json.loads((out / "manifest.json").read_text())
        remove_temporaries(out)  # what a killed preparation was writing
        return _prepare(raw, out, skip_bad, workers, draft, chunk)


def _prepare(raw: Path, out: Path, skip_bad: bool, workers: int, draft: bool, chunk: int) -> dict:
    t0 = time.time()
    log.info(f"indexing {raw} ...")
    work = plan(raw, skip_bad)
    check_space(out, sum(len(info["sources"]) for split, info in work["splits"].items()
                         if not (out / split / "progress.npy").is_file()))
    for split, info in work["splits"].items():  # both before any conversion: every byte reserved up front
        start_split(out, split, info["sources"])
    manifest = {"format": FORMAT, "repro": __version__, "created": None, "raw": work["raw"],
                "devkit": work["devkit"], "size": SIZE, "resize": "shorter side to 256 (Pillow bilinear), "
                "central 256x256 crop, RGB", "draft": draft, "classes": work["classes"],
                "class_names": work["class_names"],
                "versions": {"python": platform.python_version(), "pillow": PIL.__version__,
                             "numpy": np.__version__}, "splits": {}}
    all_errors = {}
    for split, info in work["splits"].items():
        sources = info["sources"]
        log.info(f"{split}: {len(sources)} images ({info['layout']})")
        errors = convert_split(out, split, sources, workers, draft, chunk)
        all_errors.update({sources[row].name: error for row, error in errors.items()})
        manifest["splits"][split] = {
            "layout": info["layout"], "rows": len(sources), "count": len(sources) - len(errors),
            "skipped": [{"row": row, "file": sources[row].name, "error": errors[row]} for row in sorted(errors)],
            "skipped_archives": info["skipped_archives"]}
    if all_errors and not skip_bad:
        listing = "\n".join(f"  {name}: {error}" for name, error in sorted(all_errors.items()))
        raise PrepareError(f"{len(all_errors)} file(s) could not be read (everything else is prepared):\n{listing}\n"
                           "Fix or remove them and run the same command again, or add skip_bad=true to leave them "
                           "out (the manifest records each one).")
    if "train" in manifest["splits"]:
        rows = usable_rows(manifest["splits"]["train"])
        log.info(f"statistics over {len(rows)} training images ...")
        stats = compute_stats(out, rows, workers)
        atomic_write(out / "stats.npz", lambda f: np.savez(f, **stats))
        manifest["stats"] = {"file": "stats.npz", "eigvals": stats["eigvals"].tolist(),
                             "pixel_mean": stats["pixel_mean"].tolist()}
    for split in manifest["splits"]:
        manifest["splits"][split]["sha256"] = {
            name: sha256(out / split / name) for name in ("labels.npy", "sources.tsv", "crc32.npy")}
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["seconds"] = round(time.time() - t0, 1)
    write_json(out / "manifest.json", manifest)
    for split in manifest["splits"]:
        (out / split / "progress.npy").unlink()
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    log.info(f"done: {out} ({counts} images, {manifest['seconds']} s)")
    return manifest
