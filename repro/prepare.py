"""Prepare ILSVRC-2012 once (§2 of the paper): every image's shorter side resized to 256, the central 256x256
crop, RGB uint8, into one memory-mapped array per split, with labels, the source of every row and a manifest;
then the training set's statistics (per-pixel mean image, RGB covariance and its eigen-decomposition, §4.1).

Input: whatever `repro.sources.plan` finds in the raw folder, in any of the layouts listed there; the manifest
records which (`source`).

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
import signal
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from repro import __version__
from repro.errors import PrepareError
from repro.io import atomic_write, disk_full, free_space, human, locked, remove_temporaries, write_json
from repro.progress import Progress, progress
from repro.sources import Reader, Source, chunks, plan
from repro.store import FORMAT, SIZE, usable_rows

RESIZE = Image.Resampling.BILINEAR  # the paper names none; Pillow's bilinear is antialiased when shrinking
TODO, DONE, BAD = 0, 1, 2  # states of a row in <split>/progress.npy
IMAGE_BYTES = SIZE * SIZE * 3  # 196,608 bytes a row of images.npy
ROW_EXTRA, STORE_EXTRA = 256, 16_000_000  # bytes, generous: a row's label, checksum and line; stats and manifest
log = logging.getLogger("repro")


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
                   crc=np.load(Path(out, split, "crc32.npy"), mmap_mode="r+"), draft=draft, reader=Reader())


def _convert_rows(rows: list[tuple[int, Source, bytes | None]]) -> list[tuple[int, str | None]]:
    """Convert a chunk of rows straight into the store, reading each source's bytes unless the chunk brings them
    (repro.sources.chunks); return (row, error or None) for each."""
    results = []
    for row, source, data in rows:
        try:
            pixels = load_256(data if data is not None else _worker["reader"].read(source), _worker["draft"])
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


def parallel(function, tasks, workers: int, initializer=None, initargs: tuple = ()):
    """`function` of every task in `workers` processes, yielding the results as they come. The tasks are taken
    from their iterable as the workers need them (two each in hand), so a task may carry data read just now. A
    worker's death (the kernel's out-of-memory killer, a signal) becomes a PrepareError: ProcessPoolExecutor
    notices it and fails, where multiprocessing.Pool would wait forever for the dead worker's task."""
    executor = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                   (initializer, initargs))
    tasks, pending = iter(tasks), set()
    try:
        while True:
            pending |= {executor.submit(function, task) for task in islice(tasks, 2 * workers - len(pending))}
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
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
    todo = [(row, s) for row, s in enumerate(sources) if status[row] != DONE]
    errors = {}
    with Progress(f"prepare {split}", len(sources), "img", initial=len(sources) - len(todo)) as bar:
        for results in parallel(_convert_rows, chunks(todo, chunk), workers, _open_worker, (str(out), split, draft)):
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
            chunk: int = 32, source: str | None = None) -> dict:
    """Prepare `raw` (in the layout `source`, or the one it holds) into `out` (see the module docstring); returns
    the manifest. Raises PrepareError on bad input, and, unless `skip_bad`, after converting everything else, when
    some files could not be read."""
    workers = workers or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "store preparation"):  # for the whole preparation: a second one into `out` is refused
        if (out / "manifest.json").is_file():
            log.info(f"{out} is already a complete prepared store (manifest.json); nothing to do")
            return json.loads((out / "manifest.json").read_text())
        remove_temporaries(out)  # what a killed preparation was writing
        return _prepare(raw, out, skip_bad, workers, draft, chunk, source)


def _prepare(raw: Path, out: Path, skip_bad: bool, workers: int, draft: bool, chunk: int,
             source: str | None) -> dict:
    t0 = time.time()
    log.info(f"indexing {raw} ...")
    work = plan(raw, source, skip_bad, map if workers == 1 else partial(parallel, workers=workers))
    check_space(out, sum(len(info["sources"]) for split, info in work["splits"].items()
                         if not (out / split / "progress.npy").is_file()))
    for split, info in work["splits"].items():  # both before any conversion: every byte reserved up front
        start_split(out, split, info["sources"])
    manifest = {"format": FORMAT, "repro": __version__, "created": None, "raw": work["raw"],
                "devkit": work["devkit"], "source": work["source"], "size": SIZE, "resize": "shorter side to 256 (Pillow bilinear), "
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
