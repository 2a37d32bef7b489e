"""Prepare ILSVRC-2012 once (§2 of the paper): every image's shorter side resized to 256, the central 256x256
crop, RGB uint8, stored per split as raw pixels or as JPEG records (`format=`), with labels, the source of every
row and a manifest; then the training set's statistics (per-pixel mean image, RGB covariance and its
eigen-decomposition, §4.1) over the records as the store serves them. `convert` makes a store of one record
format from a store of the other, without the original input.

Input: whatever `repro.sources.plan` finds in the raw folder, in any of the layouts listed there; the manifest
records which (`source`).

Output (`OUT/`): the files `repro.store` describes (and reads); `manifest.json`, written last: a store without a
manifest is unfinished. Killed at any point, the same command continues where it stopped. A prepare locks `OUT/`
(`.lock`), checks the disk space it needs and reserves its fixed-size arrays' blocks before converting anything
(docs/reliability.md).
"""

from __future__ import annotations

import collections
import errno
import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import platform
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from repro import __version__
from repro.errors import PrepareError
from repro.io import (atomic_write, available_cores, disk_full, free_space, human, locked, remove_temporaries,
                      write_json)
from repro.progress import Progress, progress
from repro.sources import Reader, Source, chunks, plan
from repro.store import (FORMAT, IMAGE_BYTES, JPEG_QUALITY, SIZE, PreparedStore, open_records, records_spec,
                         sha256, usable_rows)

RESIZE = Image.Resampling.BILINEAR  # the paper names none; Pillow's bilinear is antialiased when shrinking
TODO, DONE, BAD = 0, 1, 2  # states of a row in <split>/progress.npy
STARTED = "started.json"  # how an unfinished split's rows are made (`start_split`); the manifest says it once done
ROW_EXTRA, STORE_EXTRA = 256, 16_000_000  # bytes, generous: a row's label, checksum and line; stats and manifest
# A JPEG record's size, for the space check: 28.3 KiB on average at quality 95 over 101 real ILSVRC-2012 images
# (docs/data.md), so generous; a disk that fills up anyway stops the prepare with `disk full`, and it continues.
JPEG_BYTES = {90: 32_000, 95: 48_000, 100: 120_000}  # the first quality at or above the one asked
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


def _open_worker(out: str, split: str, draft: bool, records: dict) -> None:
    _worker.update(records=open_records(Path(out, split), records), draft=draft, reader=Reader())


def _convert_rows(rows: list[tuple[int, Source, bytes | None]]) -> list[tuple[int, str | None, bytes | None]]:
    """Convert a chunk of rows into the store, reading each source's bytes unless the chunk brings them
    (repro.sources.chunks); return (row, error or None, what the main process commits of the row's record, if
    anything: `Records.put`) for each."""
    results = []
    for row, source, data in rows:
        try:
            pixels = load_256(data if data is not None else _worker["reader"].read(source), _worker["draft"])
            results.append((row, None, _worker["records"].put(row, pixels)))
        except Exception as error:  # any failure of one file is reported with the others at the end
            results.append((row, f"{type(error).__name__}: {error}", None))
    return results


def _open_copier(source: str, split: str, source_records: dict, skipped: dict[int, str], out: str,
                 records: dict) -> None:
    _worker.update(source=open_records(Path(source, split), source_records, f"store {source}, split {split}"),
                   records=open_records(Path(out, split), records), skipped=skipped)


def _copy_rows(rows: list[tuple[int, Source, None]]) -> list[tuple[int, str | None, bytes | None]]:
    """`_convert_rows` for a conversion: the pixels come from the source store's records (checked as they are
    read: a damaged one stops the conversion, naming it); its skipped rows stay skipped, with its reasons."""
    skipped = _worker["skipped"]
    results = [(row, skipped[row], None) for row, _, _ in rows if row in skipped]
    wanted = [row for row, _, _ in rows if row not in skipped]
    for row, pixels in zip(wanted, _worker["source"].read(wanted) if wanted else []):
        results.append((row, None, _worker["records"].put(row, pixels)))
    return results


# ----------------------------------------------------------------------------------------------------------------
# The store


def check_space(out: Path, rows: int, records: dict) -> None:
    """Refuse to start when the disk of `out` cannot hold `rows` more images stored as `records` says, and what
    goes with them."""
    if records["format"] == "raw":
        image, what = IMAGE_BYTES, f"{IMAGE_BYTES:,} bytes"
    else:
        image = next(size for quality, size in sorted(JPEG_BYTES.items()) if quality >= records["quality"])
        what = f"at most about {image:,} bytes as JPEG quality {records['quality']}"
    needed, free = rows * (image + ROW_EXTRA) + STORE_EXTRA, free_space(out)
    if needed > free:
        raise PrepareError(f"not enough disk space for the store {out}: it needs {human(needed)} ({rows:,} images of "
                           f"{what}, with their labels, checksums and statistics) but {human(free)} is free there; "
                           "free some space or choose another store=")


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


def start_split(out: Path, split: str, sources: list[Source], records: dict, how: dict | None = None) -> None:
    """Allocate a split's files once, stored as `records` says, reserving their space; a rerun finds them and
    checks they were planned from the same input, in the same format, the same way (`how`: what else decides the
    records, e.g. the prepare's `draft` or the store a conversion reads), so that no store mixes two kinds of rows."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    files = open_records(folder, records)
    table = "".join(f"{s.name}\t{s.path}\t{s.offset}\t{s.size}\n" for s in sources)
    started = {"records": records, **(how or {})}
    if (folder / "progress.npy").is_file():
        if (folder / "sources.tsv").read_text() != table:
            raise PrepareError(f"{folder} was started from different input files; prepare into a new folder or "
                               f"delete {folder}")
        missing = [name for name in files.files if not (folder / name).is_file()]
        if missing:
            raise PrepareError(f"{folder} was started in another format than format={records['format']} (it has no "
                               f"{missing[0]}): run the command it was started with, or prepare into a new folder")
        before = json.loads((folder / STARTED).read_text()) if (folder / STARTED).is_file() else started
        if before != started:
            key = next(k for k in {**before, **started} if before.get(k) != started.get(k))
            raise PrepareError(f"{folder} was started with {key}={json.dumps(before.get(key))}, not "
                               f"{json.dumps(started.get(key))}: its rows would be made two ways; run the command it "
                               "was started with, or prepare into a new folder")
    else:
        write_json(folder / STARTED, started)
        atomic_write(folder / "sources.tsv", lambda f: f.write(table.encode()))
        atomic_write(folder / "labels.npy", lambda f: np.save(f, np.array([s.label for s in sources], np.int16)))
        files.create(len(sources))
    for name in files.reserved:  # again on a rerun: a store started before reserving was sparse
        reserve(folder / name)
    if not (folder / "progress.npy").is_file():  # last: its presence says the files above are complete
        atomic_write(folder / "progress.npy", lambda f: np.save(f, np.zeros(len(sources), np.uint8)))


# The signals that stop a preparation (Ctrl-C, a scheduler's SIGTERM), which a terminal or a scheduler sends to every
# process of the job: repro-prepare handles them (one line: what is kept); its workers leave them to it.
STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _start_worker(initializer, initargs: tuple) -> None:
    """A worker's set-up: the stop signals are the parent's to handle (it stops, and the pool's workers are ended
    with it; a worker would print a KeyboardInterrupt traceback of its own); then the caller's own. A worker starts
    with them blocked (`parallel`), so one that comes while it imports waits here, and is dropped."""
    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def parallel(function, tasks, workers: int, initializer=None, initargs: tuple = ()):
    """`function` of every task in `workers` processes, yielding the results in the tasks' order. The tasks are
    taken from their iterable as the workers need them (two each in hand), so a task may carry data read just now.
    A worker's death (the kernel's out-of-memory killer, a signal) becomes a PrepareError: ProcessPoolExecutor
    notices it and fails, where multiprocessing.Pool would wait forever for the dead worker's task. Left early (a
    stop signal, an error), it ends the workers without waiting for their tasks, whose results nobody would keep."""
    executor = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                   (initializer, initargs))
    stops = {signal.Signals[name] for name in STOP_SIGNALS}

    def submit(task):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a worker started here inherits the mask
        try:
            return executor.submit(function, task)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    tasks, pending, complete = iter(tasks), collections.deque(), False
    try:
        while True:
            pending.extend(submit(task) for task in islice(tasks, 2 * workers - len(pending)))
            if not pending:
                break
            yield pending.popleft().result()  # in order: a store's records are appended the same way every time
        complete = True
    except BrokenProcessPool:
        raise PrepareError("a worker process died (killed by the system, e.g. out of memory or a full disk, or by a "
                           "signal); what is done is kept: run the same command again to continue (fewer workers= "
                           "use less memory)") from None
    finally:
        # Python 3.14 has terminate_workers(); before it, the pool's own list of its processes (which shutdown drops)
        processes = [] if complete else list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=complete, cancel_futures=True)
        for process in processes:
            process.kill()  # SIGKILL: the workers ignore SIGTERM


def convert_split(out: Path, split: str, sources: list[Source], workers: int, chunk: int, records: dict, work,
                  initializer, initargs: tuple, chunker=chunks) -> dict[int, str]:
    """Convert every row not yet done, with `workers` processes running `work` on the chunks of at most `chunk`
    (row, source, bytes or None) that `chunker` makes, after `initializer(*initargs)`; returns {row: error} for the
    rows that failed."""
    status = np.load(out / split / "progress.npy", mmap_mode="r+")
    files = open_records(out / split, records)
    files.resume(status == DONE)
    todo = [(row, s) for row, s in enumerate(sources) if status[row] != DONE]
    errors = {}
    with Progress(f"prepare {split}", len(sources), "img", initial=len(sources) - len(todo)) as bar:
        for results in parallel(work, chunker(todo, chunk), workers, initializer, initargs):
            try:
                files.commit(results)  # before the rows are marked done
            except OSError as error:
                if disk_full(error):
                    raise PrepareError(f"disk full: {out / split} could not take more records "
                                       f"({human(free_space(out))} free there); what is done is kept: free some space "
                                       "and run the same command again") from None
                raise
            for row, error, _ in results:
                status[row] = BAD if error else DONE
                if error:
                    errors[row] = error
            status.flush()
            bar.update(len(results))
    return errors


def compute_stats(out: Path, rows: np.ndarray, workers: int, records: dict, chunk: int = 64) -> dict[str, np.ndarray]:
    """§4.1 statistics of the training rows as the store serves them (JPEG records decoded as the loader decodes
    them), each record checked against its CRC-32: the per-pixel mean image (§2) and the 3x3 covariance of RGB
    pixel values on the 0-255 scale, with its eigenvalues (descending) and eigenvectors (columns). Exact: float64
    sums of integer-valued terms stay exact below 2^53, which 1.28M 256x256 images do not reach."""
    folder = str(out / "train")
    parts = [(folder, records, rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
    image_sum = np.zeros((SIZE, SIZE, 3))
    pixel_sum, outer_sum = np.zeros(3), np.zeros((3, 3))
    # a few chunks are summed here: starting workers that decode JPEG (importing torch) would take longer
    sums = map(_partial_sums, parts) if len(parts) <= workers else parallel(_partial_sums, parts, workers)
    for a, b, c in progress(sums, "statistics", len(parts), "chunk"):
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
    folder, records, rows = part
    files = open_records(Path(folder), records)
    try:
        x = files.read(np.sort(rows)).astype(np.float64)
    finally:
        files.close()  # a process sums many chunks: ~20,000 for ILSVRC-2012's training split
    flat = x.reshape(-1, 3)
    return x.sum(axis=0), flat.sum(axis=0), flat.T @ flat


def prepare(raw: Path, out: Path, skip_bad: bool = False, workers: int | None = None, draft: bool = True,
            chunk: int = 32, source: str | None = None, record_format: str = "raw",
            quality: int = JPEG_QUALITY) -> dict:
    """Prepare `raw` (in the layout `source`, or the one it holds) into `out` (see the module docstring), its
    images stored as `record_format` (`raw` or `jpeg` of `quality`); returns the manifest. Raises PrepareError on
    bad input, and, unless `skip_bad`, after converting everything else, when some files could not be read."""
    records = records_spec(record_format, quality)
    workers = workers or available_cores()
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "store preparation"):  # for the whole preparation: a second one into `out` is refused
        if (out / "manifest.json").is_file():
            return finished(out, records)
        remove_temporaries(out)  # what a killed preparation was writing
        return _prepare(raw, out, skip_bad, workers, draft, chunk, source, records)


def finished(out: Path, records: dict) -> dict:
    """The manifest of the complete store `out`, which must hold the records asked for."""
    manifest = PreparedStore(out).manifest
    held = manifest.get("records", {"format": "raw"})
    if {k: held.get(k) for k in ("format", "quality")} != {k: records.get(k) for k in ("format", "quality")}:
        described = " ".join(f"{k}={v}" for k, v in held.items() if k in ("format", "quality"))
        raise PrepareError(f"{out} is already a complete store of {described} records, not of the ones asked for: "
                           f"choose another store=, or convert it: repro-convert source={out} store=<new folder> "
                           f"{' '.join(f'{k}={v}' for k, v in records.items() if k in ('format', 'quality'))}")
    log.info(f"{out} is already a complete prepared store (manifest.json); nothing to do")
    return manifest


def _prepare(raw: Path, out: Path, skip_bad: bool, workers: int, draft: bool, chunk: int, source: str | None,
             records: dict) -> dict:
    t0 = time.time()
    log.info(f"indexing {raw} ...")
    work = plan(raw, source, skip_bad, map if workers == 1 else partial(parallel, workers=workers))
    check_space(out, sum(len(info["sources"]) for split, info in work["splits"].items()
                         if not (out / split / "progress.npy").is_file()), records)
    for split, info in work["splits"].items():  # both before any conversion: every byte reserved up front
        start_split(out, split, info["sources"], records, {"draft": draft})
    manifest = {"format": FORMAT, "repro": __version__, "created": None, "records": records, "raw": work["raw"],
                "devkit": work["devkit"], "source": work["source"],
                "size": SIZE, "resize": "shorter side to 256 (Pillow bilinear), "
                "central 256x256 crop, RGB", "draft": draft, "classes": work["classes"],
                "class_names": work["class_names"], "versions": versions(), "splits": {}}
    all_errors = {}
    for split, info in work["splits"].items():
        sources = info["sources"]
        log.info(f"{split}: {len(sources)} images ({info['layout']})")
        errors = convert_split(out, split, sources, workers, chunk, records, _convert_rows, _open_worker,
                               (str(out), split, draft, records))
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
    return finish(out, manifest, workers, t0)


def versions() -> dict:
    """The versions of what wrote and encoded (Pillow) and what decodes (torchvision) the records."""
    return {"python": platform.python_version(), "pillow": PIL.__version__, "numpy": np.__version__,
            **{name: importlib.metadata.version(name) for name in ("torch", "torchvision")}}


def finish(out: Path, manifest: dict, workers: int, t0: float) -> dict:
    """Complete the store `out` whose splits are all converted: the statistics, the checksums of its small files,
    then the manifest, last; returns it."""
    records = manifest["records"]
    if "train" in manifest["splits"]:
        rows = usable_rows(manifest["splits"]["train"])
        log.info(f"statistics over {len(rows)} training images ...")
        stats = compute_stats(out, rows, workers, records)
        atomic_write(out / "stats.npz", lambda f: np.savez(f, **stats))
        manifest["stats"] = {"file": "stats.npz", "sha256": sha256(out / "stats.npz"),
                             "eigvals": stats["eigvals"].tolist(), "pixel_mean": stats["pixel_mean"].tolist()}
    for split, info in manifest["splits"].items():
        files = open_records(out / split, records)
        info.update(files.finish(np.load(out / split / "progress.npy") == DONE))
        info["sha256"] = {name: sha256(out / split / name)
                          for name in ("labels.npy", "sources.tsv", *files.checksummed)}
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["seconds"] = round(time.time() - t0, 1)
    write_json(out / "manifest.json", manifest)
    for split in manifest["splits"]:
        (out / split / "progress.npy").unlink()
        (out / split / STARTED).unlink(missing_ok=True)
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    log.info(f"done: {out} ({counts} images, {manifest['seconds']} s)")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Converting a store into another record format


def convert(source: Path, out: Path, record_format: str = "jpeg", quality: int = JPEG_QUALITY,
            workers: int | None = None, chunk: int = 32) -> dict:
    """The store `source` with its images stored as `record_format` (of `quality`) in the new store `out`: the
    same rows, labels, sources and skipped rows; the records re-encoded from the source's pixels (each checked
    against its CRC-32 as it is read), the statistics computed anew from what `out` serves. Locked, space-checked
    and restartable like `prepare`; returns the manifest."""
    records = records_spec(record_format, quality)
    workers = workers or available_cores()
    if Path(out).resolve() == Path(source).resolve():
        raise PrepareError(f"store={out} is the source store itself: give the converted store a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "store conversion"):
        if (out / "manifest.json").is_file():  # done before: the source store may be gone by now
            return finished(out, records)
        store = PreparedStore(source)
        remove_temporaries(out)
        t0 = time.time()
        source_manifest = store.manifest
        check_space(out, sum(info["rows"] for split, info in source_manifest["splits"].items()
                             if not (out / split / "progress.npy").is_file()), records)
        split_sources = {split: stored_sources(store, split) for split in source_manifest["splits"]}
        for split, sources in split_sources.items():
            start_split(out, split, sources, records, {"converted_from": str(store.root.resolve())})
        manifest = {key: value for key, value in source_manifest.items()
                    if key not in ("stats", "created", "seconds", "versions")}
        manifest.update(format=FORMAT, repro=__version__, records=records, versions=versions(),
                        converted_from={"store": str(store.root.resolve()), "records": store.records_spec})
        for split, sources in split_sources.items():
            info = source_manifest["splits"][split]
            skipped = {entry["row"]: entry.get("error", "skipped") for entry in info["skipped"]}
            log.info(f"{split}: {info['rows']} rows from {store.root} ({store.record_format} -> {record_format})")
            errors = convert_split(out, split, sources, workers, chunk, records, _copy_rows, _open_copier,
                                   (str(store.root), split, store.records_spec, skipped, str(out), records),
                                   in_row_order)
            assert errors == skipped, "a conversion fails only on the rows its source skipped"
            manifest["splits"][split] = {key: value for key, value in info.items() if key not in ("sha256", "bytes")}
        return finish(out, manifest, workers, t0)


def in_row_order(rows: list[tuple[int, Source]], size: int):
    """`rows` as chunks of at most `size` (row, source, None), in row order: a conversion reads the source store's
    records by row, never the original input (which may be gone)."""
    for start in range(0, len(rows), size):
        yield [(row, source, None) for row, source in rows[start:start + size]]


def stored_sources(store: PreparedStore, split: str) -> list[Source]:
    """A store split's rows as the prepare planned them (from its sources.tsv, checked against the manifest's
    sha256, and its labels)."""
    opened, path = store.split(split), store.root / split / "sources.tsv"
    opened.records.check_sha256("sources.tsv", store.manifest["splits"][split].get("sha256", {}).get("sources.tsv"))
    lines = path.read_text().splitlines()
    if len(lines) != len(opened.labels):
        raise PrepareError(f"{path} has {len(lines):,} lines for {len(opened.labels):,} rows: the store is damaged; "
                           "prepare it again")
    sources = []
    for number, (line, label) in enumerate(zip(lines, opened.labels.tolist()), start=1):
        try:
            name, file, offset, size = line.rsplit("\t", 3)  # a tab in a name or path: the same line again
            sources.append(Source(name, file, int(offset), int(size), label))
        except ValueError:
            raise PrepareError(f"{path}, line {number:,}: {line[:80]!r} is not name, path, offset and size: the store "
                               "is damaged; prepare it again") from None
    return sources
