"""What survives what (docs/reliability.md): a full disk, a damaged checkpoint, two processes on one folder, a dead
worker, damaged raw archives, bad values and the wrong store, each reproduced and met with one clear line."""

import dataclasses
import errno
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from devkit import write_devkit
from helpers import command, tiny_cfg, train_config
from repro import prepare as prepare_module
from repro.checkpoint import check_classes, load_checkpoint, save_checkpoint
from repro.cli import convert_main, given_run_dir, prepare_main, resume_main
from repro.config import AUGMENT_OPTIONS, CONF_DIR, SEED_LIMIT, TOOL_CONFIGS, EvalConfig, TrainConfig, validate
from repro.data import batches
from repro.demo_data import DEVKIT_TAR, TRAIN_TAR, make_demo_data
from repro.distributed import World
from repro.errors import DiskFullError, FolderBusyError, PrepareError, RunError
from repro.evaluate import evaluate_checkpoint
from repro.io import atomic_write, flatten, locked, remove_temporaries, write_json
from repro.prepare import IMAGE_BYTES, prepare, start_split
from repro.reports.paper import comparison_table, standard_error, write_report
from repro.runtime import worker_count
from repro.store import PreparedStore, records_spec
from repro.train import train
from test_prepare import jpeg_bytes, small_raw


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (a real disk that fills up); skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Take all the free space of `folder`'s disk but `leave` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(folder).free - leave)
    return filler


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:  # it ended meanwhile
        return []
    return children + [d for c in children for d in descendants(c)]


def is_worker(pid: int) -> bool:
    """A multiprocessing worker started by `spawn` (not its resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return False


def rows_done(store: Path, split: str = "train") -> int:
    try:
        return int((np.load(store / split / "progress.npy") != 0).sum())
    except (OSError, ValueError, EOFError):  # not there yet, or being replaced
        return 0


def wait_for(condition, seconds: float = 120, what: str = "the condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def big_jpegs(raw: Path, count: int) -> Path:
    """`count` large noisy JPEGs (slow to decode at full size, four different ones: quick to make), so that a
    preparation lasts long enough to be disturbed."""
    pictures = [jpeg_bytes(size=(1400, 1000), seed=seed) for seed in range(4)]
    for c in range(2):
        folder = raw / "train" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(count // 2):
            (folder / f"{i}.JPEG").write_bytes(pictures[(c + 2 * i) % 4])
    return raw


# -- 1. a full disk during the preparation ------------------------------------------------------------------------


def test_prepare_refuses_a_store_its_disk_cannot_hold_before_any_work(demo_raw, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "free_space", lambda folder: 5_000_000)
    with pytest.raises(PrepareError, match=r"not enough disk space for the store .*: it needs 2\d\.\d MB \(64 images "
                                           r"of 196,608 bytes, .*\) but 5\.0 MB is free there"):
        prepare(demo_raw, tmp_path / "store", workers=1)
    assert not (tmp_path / "store" / "train").exists()


@pytest.mark.parametrize("record_format, arrays", [("raw", {"images.npy": IMAGE_BYTES, "crc32.npy": 4}),
                                                    ("jpeg", {"jpegs.npy": 16, "crc32.npy": 4})])
def test_a_split_reserves_its_arrays_blocks(demo_raw, tmp_path, record_format, arrays):
    sources = prepare_module.plan(demo_raw, skip_bad=True)["splits"]["train"]["sources"]
    start_split(tmp_path, "train", sources, records_spec(record_format))
    for name, row_bytes in arrays.items():
        array = tmp_path / "train" / name
        assert array.stat().st_size > len(sources) * row_bytes
        assert array.stat().st_blocks * 512 >= array.stat().st_size, name  # allocated, not a sparse file


def test_prepare_on_a_real_disk_too_small_is_refused(demo_raw, tmpfs):
    disk = tmpfs("2m")
    with pytest.raises(PrepareError, match=r"it needs 2\d\.\d MB .* but 2\.\d MB is free there"):
        prepare(demo_raw, disk / "store", workers=1)


def test_prepare_survives_its_disk_filling_up_after_it_started(demo_raw, demo_store, tmpfs, monkeypatch):
    """The campaign's hang: the disk fills up during the conversion (here: right before it). The arrays' blocks
    were reserved, so the workers' writes cannot fail; only the small files at the end need the last megabytes."""
    disk = tmpfs("40m")
    convert = prepare_module.convert_split

    def convert_on_a_full_disk(out, *args, **kwargs):
        if not (disk / "filler").exists():
            fill(disk, leave=3_000_000)
        return convert(out, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "convert_split", convert_on_a_full_disk)
    prepare(demo_raw, disk / "store", skip_bad=True, workers=2)
    for name in ("images.npy", "labels.npy", "crc32.npy"):
        assert (disk / "store" / "train" / name).read_bytes() == (demo_store / "train" / name).read_bytes()


def test_a_dead_worker_stops_the_prepare_with_a_message(tmp_path):
    raw, store = big_jpegs(tmp_path / "raw", 160), tmp_path / "store"
    process = subprocess.Popen(command("repro-prepare", f"raw={raw}", f"store={store}", "workers=1", "draft=false"),
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Rows go to the one worker in chunks of 32: once one chunk is done, the worker holds the next.
        wait_for(lambda: 32 <= rows_done(store) < 160, what="the first chunk")
        worker = [pid for pid in descendants(process.pid) if is_worker(pid)]
        os.kill(worker[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _, stderr = process.communicate(timeout=120)  # a hang (multiprocessing.Pool) fails here
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2 and "Traceback" not in stderr
    assert "repro-prepare: error: a worker process died" in stderr and "run the same command again" in stderr


# -- 2. a damaged checkpoint ---------------------------------------------------------------------------------------


def tensor_data(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest tensor's bytes inside the checkpoint file `path` (a stored zip member)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def flip_bytes(path: Path) -> None:
    offset, size = tensor_data(path)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        data = f.read(8)
        f.seek(offset + size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


DAMAGE = {"flipped bytes in a tensor": flip_bytes,
          "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
          "empty": lambda p: os.truncate(p, 0)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_intact_previous_one(tmp_path, damage):
    last = tmp_path / "last.pt"
    for step in (1, 2):
        save_checkpoint(last, {"model": {"w": torch.full((4096,), float(step))}, "global_step": step},
                        keep_previous=True)
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["global_step"] == 1
    DAMAGE[damage](last)
    if damage == "flipped bytes in a tensor":
        torch.load(last, weights_only=True)  # the fault: torch checks no CRC, so this loads without a word
    with pytest.raises(RunError, match=rf"checkpoint {re.escape(str(last))} is damaged \(.*\); "
                                       rf"{re.escape(str(tmp_path / 'last.prev.pt'))} \(step 1\) is intact: "
                                       rf"`cp .*last.prev.pt .*last.pt` and run the same command to resume"):
        load_checkpoint(last)
    flip_bytes(tmp_path / "last.prev.pt")
    with pytest.raises(RunError, match="no intact checkpoint is left beside it"):
        load_checkpoint(last)


def test_a_damaged_checkpoint_names_the_newest_intact_one_beside_it(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"

    def save(path, step, keep_previous=False):
        save_checkpoint(path, {"model": {"w": torch.full((4096,), float(step))}, "global_step": step}, keep_previous)

    save(last, 1, True), save(best, 2), save(last, 3, True)  # last.prev.pt: step 1, best.pt: step 2, last.pt: 3
    flip_bytes(last)
    with pytest.raises(RunError, match=rf"{re.escape(str(best))} \(step 2\) is intact: `cp .*best.pt .*last.pt`"):
        load_checkpoint(last)  # best.pt is newer than last.prev.pt
    flip_bytes(best)
    with pytest.raises(RunError, match=rf"{re.escape(str(tmp_path / 'last.prev.pt'))} \(step 1\) is intact"):
        load_checkpoint(last)
    save(last, 4)
    with pytest.raises(RunError, match=rf"checkpoint {re.escape(str(best))} is damaged .*"
                                       rf"{re.escape(str(last))} \(step 4\) is intact: use it instead"):
        load_checkpoint(best)  # e.g. repro-eval checkpoint=.../best.pt


@pytest.mark.slow
def test_a_run_refuses_its_damaged_last_checkpoint_and_resumes_from_a_lone_previous_one(demo_store, tmp_path):
    train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1"))  # saves at steps 2 and 4, and at the epoch's end
    (tmp_path / "metrics.json").unlink()  # so that the longer run below evaluates and writes its own
    checkpoints = tmp_path / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"last.pt", "last.prev.pt", "best.pt"}
    flip_bytes(checkpoints / "last.pt")
    with pytest.raises(RunError, match=r"last.pt is damaged .*(last.prev|best).pt \(step 4\) is intact"):
        train(tiny_cfg(demo_store, tmp_path))
    assert "is damaged" in json.loads((tmp_path / "failed.json").read_text())["error"]
    (checkpoints / "last.pt").unlink()  # as a stop between the two renames of a save leaves it
    metrics = train(tiny_cfg(demo_store, tmp_path))
    assert metrics["epoch"] == 2 and metrics["step"] == 8
    assert "last.pt is missing but" in (tmp_path / "train.log").read_text()


# -- 3. two processes on one folder, and unique temporaries -------------------------------------------------------


def test_the_run_folder_to_lock_is_read_from_the_command_line():
    assert given_run_dir(["model.lrn=false", "hydra.run.dir=/tmp/a", "hydra.run.dir=runs/b"]) == Path("runs/b")
    assert given_run_dir(["hydra.run.dir=runs/${now:%H}"]) is None  # Hydra resolves it: train() locks it then
    assert given_run_dir(["-m", "hydra.run.dir=runs/b"]) is None  # each job of a sweep locks its own
    assert given_run_dir(["hydra.run.dir=[a,"]) is None  # malformed: Hydra's own message follows


def test_a_second_training_process_on_a_run_folder_is_refused_naming_the_first(demo_store, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(command("repro-train", "experiment=tiny", f"data.store={demo_store}",
                                     f"hydra.run.dir={run}", "schedule.max_epochs=1000"),  # killed long before
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: f"pid {first.pid} " in read_or_empty(run / ".lock")
                 and (run / ".hydra" / "overrides.yaml").is_file(), what="the first run's lock")
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = subprocess.run(command("repro-train", "experiment=tiny", f"data.store={demo_store}",
                                        f"hydra.run.dir={run}", "optim.lr=0.02"), capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert re.match(rf"repro-train: error: {re.escape(str(run))} is in use by pid {first.pid} on "
                    rf"{re.escape(socket.gethostname())} \(a training run, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)",
                    second.stderr)
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides  # the first run's record is untouched
    assert not (run / "failed.json").exists()
    with locked(run, "check"):  # the kill released the lock
        pass


def test_a_second_prepare_into_a_store_is_refused_naming_the_first(tmp_path):
    raw, store = big_jpegs(tmp_path / "raw", 80), tmp_path / "store"
    first = subprocess.Popen(command("repro-prepare", f"raw={raw}", f"store={store}", "workers=1", "draft=false"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: f"pid {first.pid} " in read_or_empty(store / ".lock"), what="the first prepare's lock")
        second = subprocess.run(command("repro-prepare", f"raw={raw}", f"store={store}", "workers=1"),
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first prepare ended before the second started"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"error: {store} is in use by pid {first.pid} on {socket.gethostname()} (a store preparation" in \
        second.stderr


def test_the_lock_is_held_across_processes_and_reentrant_within_one(tmp_path):
    holder = subprocess.Popen(command("python", "-c", "import sys, time; from repro.io import locked\n"
                                      f"with locked(__import__('pathlib').Path({str(tmp_path)!r}), 'test'):\n"
                                      "    print('held', flush=True); time.sleep(60)"), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(FolderBusyError, match=rf"is in use by pid {holder.pid} on .* \(a test, started"):
            with locked(tmp_path, "test"):
                pass
        with pytest.raises(FolderBusyError):
            train(tiny_cfg("nowhere", tmp_path))  # refused before it touches the folder
        assert not (tmp_path / "train.log").exists() and not (tmp_path / "failed.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path, "test"), locked(tmp_path, "test"):
        pass


def test_temporaries_have_names_of_their_own_and_stale_ones_are_removed(tmp_path):
    names = []
    for _ in range(2):
        atomic_write(tmp_path / "file", lambda f: names.append(Path(f.name).name))
    assert names[0] != names[1] and all(name.startswith(".file.") and name.endswith(".tmp") for name in names)
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".last.pt.123.0a1b2c3d.tmp", tmp_path / "sub" / ".labels.npy.9.ffffffff.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed writer")
    remove_temporaries(tmp_path)
    assert not any(path.exists() for path in stale) and (tmp_path / "file").exists()


# -- 4. a full disk during training --------------------------------------------------------------------------------


@pytest.mark.parametrize("room", [0, 1000, 3_000_000])
def test_a_write_on_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, room):
    path = tmp_path / "failed.json"
    write_json(path, {"before": 1})
    with pytest.raises(DiskFullError, match=rf"disk full: {re.escape(str(path))} could not be written \(.* free "
                                            r"on its disk\)"):
        atomic_write(path, lambda f: FullDisk(f, room).write(b"x" * 4_000_000))
    with pytest.raises(DiskFullError, match="disk full"):  # torch.save's own error wraps the OSError
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(1_000_000)}, FullDisk(f, room)))
    assert json.loads(path.read_text()) == {"before": 1} and not temporaries(tmp_path)


def test_a_full_disk_during_training_says_so_and_leaves_no_temporaries(demo_store, tmp_path, monkeypatch):
    save, saves = torch.save, []

    def save_on_a_disk_that_fills_up(obj, f, *args, **kwargs):
        saves.append(f.name)
        return save(obj, f if len(saves) < 2 else FullDisk(f, 1_000_000), *args, **kwargs)  # 1 of ~7 MB

    stale = tmp_path / "checkpoints" / ".last.pt.1.00000000.tmp"  # a killed run's, removed at the start
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    monkeypatch.setattr(torch, "save", save_on_a_disk_that_fills_up)
    with pytest.raises(RunError, match=r"^disk full: .*last.pt could not be written \(.* free on its disk\); "
                                       r".*last.pt \(step 2\) is intact: free some space and run the same command"):
        train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1"))
    assert not temporaries(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == 2
    assert json.loads((tmp_path / "failed.json").read_text())["error"].startswith("disk full")


@pytest.mark.slow
def test_training_on_a_really_full_disk_resumes_exactly_once_space_is_freed(demo_store, tiny_run, tmpfs,
                                                                            monkeypatch):
    from repro.run import Run

    disk, save = tmpfs("100m"), Run.save  # four checkpoints of 7 MB (experiment=tiny) at the peak of a save

    def save_then_fill_the_disk(run, best=False):
        save(run, best)
        if not (disk / "filler").exists():
            fill(disk, leave=100_000)

    monkeypatch.setattr(Run, "save", save_then_fill_the_disk)
    with pytest.raises(RunError, match=r"disk full: .*last.pt could not be written .*\(step 2\) is intact"):
        train(tiny_cfg(demo_store, disk / "run"))
    assert not temporaries(disk)
    monkeypatch.undo()
    (disk / "filler").unlink()
    train(tiny_cfg(demo_store, disk / "run"))
    resumed = torch.load(disk / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    uninterrupted = torch.load(tiny_run[0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


# -- 5. damaged raw data -------------------------------------------------------------------------------------------


@pytest.fixture
def small_demo(tmp_path) -> tuple[Path, list[str]]:
    raw = tmp_path / "raw"
    info = make_demo_data(raw, num_classes=2, train_per_class=3, val_per_class=2, seed=0)
    return raw, info["wnids"]


def replace_class_archive(raw: Path, wnid: str, data: bytes) -> None:
    """The train tar with `wnid`.tar's bytes replaced by `data`."""
    with tarfile.open(raw / TRAIN_TAR) as outer:
        members = [(m, outer.extractfile(m).read()) for m in outer if m.isfile()]
    with tarfile.open(raw / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for member, content in members:
            content = data if member.name == f"{wnid}.tar" else content
            member.size = len(content)
            outer.addfile(member, io.BytesIO(content))


def empty_tar() -> bytes:
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w").close()
    return buffer.getvalue()


@pytest.mark.parametrize("data, problem", [(b"", "not a tar archive"), (b"no tar at all" * 100, "not a tar archive"),
                                           (empty_tar(), "no images in it")])
def test_an_unusable_class_archive_is_named_and_can_be_skipped(small_demo, tmp_path, data, problem, caplog):
    raw, wnids = small_demo
    replace_class_archive(raw, wnids[0], data)
    with pytest.raises(PrepareError, match=rf"{TRAIN_TAR}: 1 class archive\(s\) cannot be used:\n  {wnids[0]}.tar: "
                                           rf"{problem}.*\nDownload {TRAIN_TAR} again, or add skip_bad=true"):
        prepare(raw, tmp_path / "store", workers=1)
    assert not (tmp_path / "store" / "train").exists()  # refused before any conversion
    manifest = prepare(raw, tmp_path / "store", skip_bad=True, workers=1)
    assert [a["file"] for a in manifest["splits"]["train"]["skipped_archives"]] == [f"{wnids[0]}.tar"]
    assert manifest["splits"]["train"]["rows"] == 3  # the other class's images
    assert f"left out {wnids[0]}.tar: {problem}" in caplog.text


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_damaged_devkit_is_named(small_demo, tmp_path, skip_bad):
    raw, _ = small_demo
    devkit = raw / DEVKIT_TAR
    os.truncate(devkit, devkit.stat().st_size // 2)
    with pytest.raises(PrepareError, match=rf"devkit archive .*{DEVKIT_TAR} is damaged .*download {DEVKIT_TAR} "):
        prepare(raw, tmp_path / "store", skip_bad=skip_bad, workers=1)
    devkit.unlink()
    write_devkit(raw / "ILSVRC2012_devkit_t12", {1: "n00000001"}, [1])
    (raw / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, damaged" + bytes(200))
    with pytest.raises(PrepareError, match=r"devkit .*ILSVRC2012_devkit_t12: data/meta.mat or the ground truth could "
                                           r"not be read \(.*\); the devkit is damaged"):
        prepare(raw, tmp_path / "store", skip_bad=skip_bad, workers=1)


def test_a_missing_devkit_is_named_as_such(small_demo, tmp_path):
    raw, _ = small_demo
    (raw / DEVKIT_TAR).unlink()
    with pytest.raises(PrepareError, match=rf"holds {TRAIN_TAR} but no devkit, which lists its classes: put "
                                           rf"{DEVKIT_TAR}"):
        prepare(raw, tmp_path / "store", workers=1)


# -- 6. bad values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-0.01", "optim.lr=-0.01: must be above 0"),
    ("optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("optim.momentum=1.5", "optim.momentum=1.5: must be below 1"),
    ("data.limit_train=-5", "data.limit_train=-5: must be at least 1"),
    ("seed=-1", "seed=-1: must be at least 0"),
    (f"seed={2**70}", f"seed={2**70}: must be below {2**64}"),  # the campaign's: a traceback from torch.manual_seed
    ("data.workers=-1", "data.workers=-1: must be at least 0"),
    ("schedule.milestones=[24,-1]", r"schedule.milestones=\[24, -1\]: each value must be at least 0"),
])
def test_bad_values_are_refused_naming_the_key(demo_store, tmp_path, override, message):
    with pytest.raises(RunError, match=f"^{message}$"):
        train(tiny_cfg(demo_store, tmp_path, override))
    assert not (tmp_path / "checkpoints").exists()  # refused before anything started


def limited_fields(node: DictConfig, prefix: str = ""):
    """(key, type name, rule, bound) of every numeric setting with limits under `node`."""
    for spec in dataclasses.fields(OmegaConf.get_type(node)):
        if not OmegaConf.is_missing(node, spec.name) and isinstance(node[spec.name], DictConfig):
            yield from limited_fields(node[spec.name], f"{prefix}{spec.name}.")
        for rule, bound in spec.metadata.get("limits", {}).items():
            yield f"{prefix}{spec.name}", str(spec.type), rule, bound() if callable(bound) else bound


SCHEMAS = {"train": TrainConfig, "eval": EvalConfig, **TOOL_CONFIGS}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_limit_of_every_schema_is_enforced(name):
    cfg = OmegaConf.structured(SCHEMAS[name])
    fields = list(limited_fields(cfg))
    if name in ("train", "eval", "prepare", "figures", "figure1"):
        assert fields
    for key, kind, rule, bound in fields:
        step = 0.5 if "float" in kind else 1
        bad = {"at_least": bound - step, "above": bound, "below": bound, "at_most": bound + step}[rule]
        broken = cfg.copy()
        OmegaConf.update(broken, key, [bad] if "List" in kind else bad)
        with pytest.raises(RunError, match=rf"^{re.escape(key)}=.*must be {rule.replace('_', ' ')} "):
            validate(broken)
    for key, kind, _, _ in fields:
        if "float" in kind:
            broken = cfg.copy()
            OmegaConf.update(broken, key, [math.nan] if "List" in kind else math.inf)
            with pytest.raises(RunError, match=rf"^{re.escape(key)}=.*must be a finite number"):
                validate(broken)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml")))
def test_every_experiment_passes_the_validation(experiment):
    validate(train_config(f"experiment={experiment}", "data.store=x"))


def test_the_other_commands_validate_their_settings(capsys):
    assert prepare_main(["raw=x", "store=y", "workers=0"]) == 2
    assert capsys.readouterr().err.strip() == "repro-prepare: error: workers=0: must be at least 1"
    assert prepare_main(["raw=x", "store=y", "format=jpeg", "quality=101"]) == 2
    assert capsys.readouterr().err.strip() == "repro-prepare: error: quality=101: must be at most 100"
    assert convert_main(["source=x", "store=y", "format=png"]) == 2
    assert "repro-convert: error: Error merging override format=png; Invalid value 'png', expected one of [raw, jpeg]" \
        in capsys.readouterr().err
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["checkpoint=nowhere.pt", "batch_size=0"])
    with pytest.raises(RunError, match="^batch_size=0: must be at least 1$"):  # before it looks for the file
        evaluate_checkpoint(cfg)


def test_a_non_finite_rate_on_the_command_line_is_one_line(demo_store, tmp_path):
    result = subprocess.run(command("repro-train", "experiment=tiny", f"data.store={demo_store}", "optim.lr=nan",
                                    f"hydra.run.dir={tmp_path}"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "repro-train: error: optim.lr=nan: must be a finite number"


# -- 7. the wrong store --------------------------------------------------------------------------------------------


def test_evaluating_on_a_store_with_other_classes_is_refused(demo_store, tiny_run, tmp_path):
    other = tmp_path / "other"
    prepare(small_raw(tmp_path / "raw"), other, workers=1)
    checkpoint = tiny_run[0] / "checkpoints" / "best.pt"
    assert torch.load(checkpoint, weights_only=True, mmap=True)["classes"] == PreparedStore(demo_store).classes
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"checkpoint={checkpoint}", f"store={other}"])
    with pytest.raises(RunError, match=rf"{re.escape(str(checkpoint))} was trained on other classes than the store "
                                       rf"{re.escape(str(other))} holds \(4 classes, the store 2\); use the store it "
                                       "was trained on"):
        evaluate_checkpoint(cfg)


def test_the_class_lists_are_compared_where_checkpoints_record_them():
    config = {"model": {"num_classes": 2}, "data": {"store": "s"}}
    check_classes({"config": config, "classes": ["a", "b"]}, Path("c.pt"), ["a", "b"], Path("s"))
    check_classes({"config": config}, Path("c.pt"), ["a", "b"], Path("s"))  # older checkpoints: the number only
    with pytest.raises(RunError, match=r"the same number of classes, in another order or not the same ones"):
        check_classes({"config": config, "classes": ["a", "b"]}, Path("c.pt"), ["b", "a"], Path("s"))
    with pytest.raises(RunError, match=r"\(2 classes, the store 3\)"):
        check_classes({"config": config}, Path("c.pt"), ["a", "b", "c"], Path("s"))


# -- 8. a refused resume, a resume that changes the experiment, the thread count ----------------------------------


def folder_state(folder: Path) -> dict:
    """Every file and folder under `folder` but the lock file: its bytes (files) and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def test_a_refused_resume_changes_nothing_and_the_run_resumes_after_it(tiny_run, demo_store, tmp_path):
    """The campaign's: Hydra rewrote .hydra/ with the refused command line, so every later resume replayed it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    before = folder_state(run)
    refused = subprocess.run(command("repro-train", "experiment=tiny", f"data.store={demo_store}", "data.limit_val=null",
                                     f"hydra.run.dir={run}", "model.lrn=false"), capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"repro-train: error: {run} holds a run with different settings (model.lrn: [None] there, [False] now)")
    assert folder_state(run) == before  # .hydra/, train.log, checkpoints: nothing written, nothing removed
    assert resume_main([f"run_dir={run}"]) == 0  # repro-resume replays the run's own command, accepted


def test_a_refused_resume_called_directly_leaves_the_folder_as_it_was(half_run, demo_store):
    before = folder_state(half_run)
    with pytest.raises(RunError, match=r"holds a run with different settings \(deterministic"):
        train(tiny_cfg(demo_store, half_run, "deterministic=false"))
    assert folder_state(half_run) == before  # no failed.json, no line in train.log


class Killed(Exception):
    """A stand-in for a SIGKILL right after a checkpoint."""


@pytest.fixture(scope="module")
def half_run(demo_store, tmp_path_factory) -> Path:
    """An experiment=tiny run killed right after its checkpoint at global step 6 (epoch 1 step 2): resumed unchanged,
    it ends with tiny_run's weights (tiny_run evaluates more images, which changes no weight). Tests that resume it
    work on a copy."""
    from repro.run import Run

    run_dir, save = tmp_path_factory.mktemp("half_run"), Run.save

    def save_then_die(run, best=False):
        save(run, best)
        if run.global_step == 6:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "save", save_then_die)
        with pytest.raises(Killed):
            train(tiny_cfg(demo_store, run_dir))
    (run_dir / "failed.json").unlink()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def ablation_switches() -> list[tuple[str, str]]:
    """(ablation=NAME, the setting it changes) for every ablation of conf/ablation/ but the baseline."""
    switches = []
    for path in sorted(Path(CONF_DIR, "ablation").glob("*.yaml")):
        settings = yaml.safe_load(path.read_text()) or {}
        if path.stem != "baseline":
            (key,) = flatten(settings)  # one switch each
            switches.append((f"ablation={path.stem}", key))
    return switches


# A changed value of every augmentation option (`Augment`'s keywords) and of the other settings that define a run
AUGMENTATION_CHANGES = {"pca_lighting": "false", "pca_std": "0.2", "lighting_style": "cuda_convnet",
                        "mean_crop": "aligned", "crop_chunk": "32"}
FIXED_CHANGES = [*ablation_switches(), *((f"data.{k}={v}", f"data.{k}") for k, v in AUGMENTATION_CHANGES.items()),
                 ("deterministic=false", "deterministic"), ("seed=1", "seed"), ("data.limit_val=4", "data.limit_val"),
                 ("optim.momentum=0.8", "optim.momentum"), ("optim.weight_decay=0", "optim.weight_decay"),
                 ("optim.decay_biases=false", "optim.decay_biases"), ("schedule.kind=plateau", "schedule.kind"),
                 ("speed.autocast=bf16", "speed.autocast"), ("speed.tf32=true", "speed.tf32"),
                 ("data.decode=gpu", "data.decode")]


def test_every_augmentation_option_is_among_the_changes_tried():
    assert set(AUGMENTATION_CHANGES) == set(AUGMENT_OPTIONS)
    assert len(ablation_switches()) == 5


@functools.cache
def tiny_record(*overrides: str) -> dict:
    """experiment=tiny's settings as a run records them."""
    return OmegaConf.to_container(tiny_cfg("s", "r", *overrides), resolve=True, enum_to_str=True)


@pytest.mark.parametrize("override, key", FIXED_CHANGES, ids=[o for o, _ in FIXED_CHANGES])
def test_a_setting_that_defines_what_a_run_measures_is_fixed_on_resume(override, key):
    from repro.run import changed_settings, fixed_on_resume

    assert changed_settings(tiny_record(), tiny_record(override)) == [key] and fixed_on_resume(key)


REFUSED = [*ablation_switches(), ("deterministic=false", "deterministic")]


@pytest.mark.parametrize("override, key", REFUSED, ids=[o for o, _ in REFUSED])
def test_a_resume_with_an_ablation_switch_or_another_determinism_is_refused(half_run, demo_store, override, key):
    """The campaign's: resumed with ablation=no_pca, the run was recorded as a whole no_pca run."""
    from repro.run import Run

    with pytest.raises(RunError, match=rf"holds a run with different settings \({re.escape(key)}: .* which define "
                                       "what it measures"):
        Run(tiny_cfg(demo_store, half_run, override))


def test_a_checkpoint_written_before_a_setting_existed_resumes(half_run, demo_store, tmp_path):
    """A setting added later (data.decode) is missing from older checkpoints: it takes its default there, which is
    what the code did before it existed, so the resume is neither refused nor recorded as a change."""
    from repro.run import Run

    run = copy_of(half_run, tmp_path)
    path = run / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["data"]["decode"]
    torch.save(checkpoint, path)
    assert Run(tiny_cfg(demo_store, run)).changes == []


def test_a_resume_may_change_the_rate_and_the_record_says_from_which_step(half_run, demo_store, tmp_path):
    run = copy_of(half_run, tmp_path)
    metrics = train(tiny_cfg(demo_store, run, "optim.lr=0.005", "log_every=1"))
    change = {"epoch": 1, "step": 2, "global_step": 6, "settings": {"optim.lr": [0.01, 0.005], "log_every": [2, 1]}}
    assert metrics["setting_changes"] == [change]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["changes"] == [change]
    assert "settings changed from epoch 1 step 2 (global step 6) on: optim.lr 0.01 -> 0.005, log_every 2 -> 1" in \
        (run / "train.log").read_text()
    assert [entry["lr"] for entry in metrics["history"]] == [0.01, 0.0005]  # epoch 1: the new rate, /10
    assert "From global step 6 (epoch 1 step 2): optim.lr 0.01 -> 0.005, log_every 2 -> 1." in write_report(run)


def test_a_deterministic_resume_takes_the_thread_count_of_the_run(half_run, tiny_run, demo_store, tmp_path):
    """CPU results depend on the thread count (conv1's weight gradient: oneDNN splits its sum over the threads), and
    a process's count follows its CPU affinity or OMP_NUM_THREADS: a resume in another one changed the weights."""
    run, threads = copy_of(half_run, tmp_path), torch.get_num_threads()
    recorded = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["threads"]
    torch.set_num_threads(recorded + 1)
    try:
        metrics = train(tiny_cfg(demo_store, run))
        assert torch.get_num_threads() == recorded == metrics["threads"]
    finally:
        torch.set_num_threads(threads)
    assert f"deterministic=true: {recorded} CPU threads, as the run had so far (this process would have " \
           f"{recorded + 1}" in (run / "train.log").read_text()
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    uninterrupted = torch.load(tiny_run[0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert metrics["setting_changes"] == []


# -- 9. signals in the last phase ----------------------------------------------------------------------------------


STOPS = [signal.SIGINT, signal.SIGTERM]


class Unhandled(Exception):
    """What a signal raises in this test process when training left no handler of its own in place."""


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_signal_during_the_final_evaluation_stops_at_once_and_loses_nothing(tiny_run, demo_store, tmp_path,
                                                                             monkeypatch, sig):
    from repro import evaluate as evaluate_module
    from repro.loop import Stopped

    run = copy_of(tiny_run[0], tmp_path)
    (run / "metrics.json").unlink()  # trained, not yet evaluated: what a stop during the final evaluation leaves
    real = evaluate_module.evaluate

    def signalled(*args, **kwargs):
        if args[4]:  # ten_crop: the 10-patch evaluation
            os.kill(os.getpid(), sig)  # a real signal, while training's handlers are (or are not) in place
        return real(*args, **kwargs)

    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    monkeypatch.setattr(evaluate_module, "evaluate", signalled)
    previous = signal.signal(sig, unhandled)  # before the fix: SIGTERM killed the process, SIGINT a traceback
    try:
        with pytest.raises(Stopped) as stop:
            train(tiny_cfg(demo_store, run, "data.limit_val=null"))
        assert signal.getsignal(sig) is unhandled  # put back
    finally:
        signal.signal(sig, previous)
    assert stop.value.hand_over() == 128 + sig
    assert str(stop.value) == (f"stopped by {sig.name} during the final evaluation; nothing is lost: training is "
                               f"complete in {run / 'checkpoints' / 'last.pt'} (global step 8) and the same command "
                               "runs the evaluation again")
    assert not (run / "metrics.json").exists() and not (run / "failed.json").exists()
    monkeypatch.setattr(evaluate_module, "evaluate", real)
    metrics = train(tiny_cfg(demo_store, run, "data.limit_val=null"))
    finished = json.loads((tiny_run[0] / "metrics.json").read_text())
    assert all(metrics[k] == finished[k] for k in ("top1_err_1crop", "top5_err_1crop", "top1_err_10crop",
                                                   "top5_err_10crop", "history"))


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_signal_during_the_prepare_is_one_line_saying_nothing_is_lost(tmp_path, monkeypatch, caplog, sig):
    from repro import cli

    def prepare_signalled(raw, store, *args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the conversion, which the signal interrupts
        raise AssertionError("the signal did not stop the preparation")

    monkeypatch.setattr(cli, "prepare", prepare_signalled)
    previous = signal.signal(sig, signal.SIG_IGN)  # this test process's own, put back after the command
    logging.getLogger("repro").addHandler(caplog.handler)  # the entry point's logger does not propagate
    try:
        assert prepare_main([f"raw={tmp_path}", f"store={tmp_path / 'store'}"]) == 128 + sig
        assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        signal.signal(sig, previous)
        logging.getLogger("repro").removeHandler(caplog.handler)
    assert caplog.messages == [f"stopped by {sig.name} during the preparation; nothing is lost: the images converted "
                               f"so far are kept in {tmp_path / 'store'} and the same command continues from them"]


def test_the_prepares_workers_leave_the_stop_signals_to_it():
    """A terminal's Ctrl-C reaches every process of the job: each worker printed a KeyboardInterrupt traceback. They
    start with the signals blocked (one that comes while a worker imports waits, then is ignored)."""
    stops = [signal.Signals[name] for name in prepare_module.STOP_SIGNALS]
    assert list(prepare_module.parallel(signal.getsignal, stops, 1)) == [signal.SIG_IGN] * len(stops)
    (blocked,) = prepare_module.parallel(functools.partial(signal.pthread_sigmask, signal.SIG_BLOCK), [[]], 1)
    assert set(stops) <= blocked and not set(stops) & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_the_prepares_pool_gives_results_in_order_and_ends_its_workers_when_left():
    """In order: a JPEG store's records are appended as the chunks were made. Left early (a stop signal, an error),
    the workers are ended, not waited for: a tar.gz shard's indexing takes minutes."""
    tasks = ["sleep 0.5; echo first", "echo second", "echo third"]
    assert list(prepare_module.parallel(subprocess.getoutput, tasks, 2)) == ["first", "second", "third"]
    before, start = set(multiprocessing.active_children()), time.perf_counter()
    pool = prepare_module.parallel(time.sleep, [0, 60, 60], 2)
    next(pool)
    pool.close()
    while set(multiprocessing.active_children()) - before and time.perf_counter() - start < 30:
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - before and time.perf_counter() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_real_prepare_signalled_as_a_terminal_does_continues_when_run_again(tmp_path, sig):
    raw, store = big_jpegs(tmp_path / "raw", 96), tmp_path / "store"
    args = command("repro-prepare", f"raw={raw}", f"store={store}", "workers=1", "draft=false")
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: 32 <= rows_done(store) < 96, what="the first chunk")
        os.killpg(process.pid, sig)  # the parent and its worker, as Ctrl-C or SLURM
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + sig and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"stopped by {sig.name} during the preparation; nothing is lost: the "
                                               f"images converted so far are kept in {store} and the same command "
                                               "continues from them")
    assert rows_done(store) >= 32 and not (store / "manifest.json").exists()
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    assert json.loads((store / "manifest.json").read_text())["splits"]["train"]["count"] == 96


@pytest.mark.slow
@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_real_training_process_signalled_during_its_final_evaluation(tiny_run, demo_store, tmp_path, sig):
    run = copy_of(tiny_run[0], tmp_path)
    (run / "metrics.json").unlink()
    signal_at_ten_patches = (  # the signal comes from the process itself, at a known point of the evaluation
        "import os, sys; import repro.evaluate as e; real = e.evaluate\n"
        "def evaluate(*a, **k):\n"
        f"    a[4] and os.kill(os.getpid(), {int(sig)})\n"
        "    return real(*a, **k)\n"
        "e.evaluate = evaluate; from repro.cli import train_main; train_main()")
    args = ["experiment=tiny", f"data.store={demo_store}", "data.limit_val=null", f"hydra.run.dir={run}"]
    result = subprocess.run(command("python", "-c", signal_at_ten_patches, *args), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 128 + sig and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"stopped by {sig.name} during the final evaluation; "
                                                             "nothing is lost")
    subprocess.run(command("repro-train", *args), check=True, capture_output=True, timeout=300)
    finished = json.loads((tiny_run[0] / "metrics.json").read_text())
    assert json.loads((run / "metrics.json").read_text())["top1_err_10crop"] == finished["top1_err_10crop"]


# -- 10. values that crashed or overloaded the machine --------------------------------------------------------------


def test_the_seed_bound_is_torchs():
    torch.manual_seed(SEED_LIMIT - 1)
    with pytest.raises(ValueError):
        torch.manual_seed(SEED_LIMIT)
    torch.manual_seed(0)
    validate(train_config("data.store=x", f"seed={SEED_LIMIT - 1}"))


def test_a_run_folder_inside_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    from repro.cli import train_main

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sys, "argv", ["repro-train", "experiment=tiny", f"hydra.run.dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(SystemExit) as stop:  # before: NotADirectoryError, with its traceback
        train_main()
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"repro-train: error: hydra.run.dir={tmp_path / 'file' / 'run'}: cannot make "
                                       f"this folder (Not a directory: {tmp_path / 'file' / 'run'}); give another "
                                       "hydra.run.dir\n")
    with pytest.raises(RunError, match=r"^run_dir=.*: cannot make this folder \(File exists: "):
        train(tiny_cfg("nowhere", tmp_path / "file"))  # repro-resume's way in


WORKER_SETTINGS = {"train": "data.workers", "eval": "workers", "figures": "workers", "preflight": "workers",
                   "prepare": "workers", "convert": "workers"}


def test_every_command_with_worker_processes_is_listed():
    with_workers = {name for name, schema in SCHEMAS.items()
                    if any(key.endswith("workers") for key, *_ in limited_fields(OmegaConf.structured(schema)))}
    assert with_workers == set(WORKER_SETTINGS)


@pytest.mark.parametrize("name", WORKER_SETTINGS)
def test_worker_processes_are_bounded_by_the_cores_on_every_command(name, monkeypatch):
    """The campaign's data.workers=1000 forked 1,000 loader processes (load 8 on two cores, 10 GB of memory)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    cfg, key = OmegaConf.structured(SCHEMAS[name]), WORKER_SETTINGS[name]
    OmegaConf.update(cfg, key, 3)
    validate(cfg)
    OmegaConf.update(cfg, key, 1000)
    with pytest.raises(RunError, match=rf"^{re.escape(key)}=1000: must be at most 3 \(the cores this process may "
                                       r"use\)$"):
        validate(cfg)


def test_the_default_worker_count_follows_the_machine(demo_store, monkeypatch):
    """The ILSVRC-2012 config's 6 loader processes made torch warn twice on the 2-core box."""
    cfg = train_config("data.store=x")  # experiment=paper's data
    split = PreparedStore(demo_store).split("train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "This DataLoader will create 6 worker processes in total ..."
        batches(split, 4, workers=worker_count(cfg.data.workers)).loader.check_worker_number_rationality()
    for cores, processes, workers in ((1, 1, 0), (2, 1, 1), (8, 1, 6), (64, 1, 6), (16, 4, 3)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        assert worker_count(None, processes) == workers
        assert worker_count(2, processes) == 2


# -- 11. a dead DDP peer -------------------------------------------------------------------------------------------


def gloo_peer_that_dies(port: int) -> None:
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=30))
    group = dist.ProcessGroupGloo(store, 1, 2, timedelta(seconds=30))
    group.allreduce([torch.ones(1)]).wait()
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would


def gloo_error_after_a_peer_died() -> tuple[RuntimeError, int]:
    """What gloo raises in rank 0 when rank 1 (a real process, forked) died after their first collective; its pid."""
    import multiprocessing
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    peer = multiprocessing.get_context("fork").Process(target=gloo_peer_that_dies, args=(store.port,))
    peer.start()
    group = dist.ProcessGroupGloo(store, 0, 2, timedelta(seconds=30))
    group.allreduce([torch.ones(1)]).wait()
    peer.join(30)
    with pytest.raises(RuntimeError) as error:
        group.allreduce([torch.ones(1)]).wait()
    return error.value, peer.pid


def test_a_dead_peer_is_named_not_reported_as_a_connection_error(tmp_path):
    error, pid = gloo_error_after_a_peer_died()
    host, world = socket.gethostname(), World(rank=0, size=2, launched=True)
    assert world.lost_peer(error, [(host, os.getpid()), (host, pid)]) == (
        f"another process of this run died: rank 1 (pid {pid}) on {host} ended (killed, e.g. by the out-of-memory "
        "killer, or failed: its own output says why)")
    assert re.fullmatch(r"another process of this run died or closed its connection \(none on .* has ended, so one "
                        r"on another machine, or one that stopped on an error of its own: the other processes' "
                        r"output says which; the collective said \"Connection (closed|reset) by peer\"\)",
                        world.lost_peer(error, [(host, os.getpid()), ("box2", 1)]))
    assert world.lost_peer(RuntimeError("CUDA out of memory"), []) is None  # not a peer's death
    assert World().lost_peer(error, []) is None  # one process has no peers


def test_a_dead_peer_stops_training_with_a_line_saying_the_same_command_resumes(tmp_path, monkeypatch):
    import types

    from repro import train as train_module

    error, pid = gloo_error_after_a_peer_died()

    def epochs(run):
        raise error

    monkeypatch.setattr(train_module, "_epochs", epochs)
    run = types.SimpleNamespace(world=World(rank=0, size=2, launched=True), checkpoints=tmp_path, last_saved_step=6)
    with pytest.raises(RunError, match=rf"^another process of this run died: rank 1 \(pid {pid}\) .*; this process "
                                       rf"stopped too, and {re.escape(str(tmp_path / 'last.pt'))} \(step 6\) is "
                                       r"intact: run the same command \(every process\) to resume$"):
        train_module._train(run, [(socket.gethostname(), os.getpid()), (socket.gethostname(), pid)])


# -- 12. the report on a part of the validation set -----------------------------------------------------------------


def test_the_report_on_a_part_of_the_validation_set_says_how_much_and_gives_each_difference_its_error():
    """The campaign's miniature: 1,300 validation images, reported as ILSVRC-2012 without an error bar."""
    metrics = {"top1_err_1crop": 47.0, "top5_err_1crop": 22.0, "top1_err_10crop": 45.0, "top5_err_10crop": 21.0}
    table = comparison_table({**metrics, "val_images": 1300}, "ILSVRC-2012")
    assert "| **this run** (ILSVRC-2012, 1,300 of the 50,000 validation images) |" in table
    # sqrt(0.45 x 0.55 / 1300) x sqrt(48,700 / 49,999) = 1.36 points; 45.0 - 40.7 = +4.30
    assert "| paper, Table 2, 1 CNN | – | – | 40.70 | 18.20 | top-1 10 patches +4.30 ± 1.36, top-5 10 patches " \
           "+2.80 ± 1.11 |" in table
    differences = [line.rsplit("|", 2)[1] for line in table.splitlines()[3:8]]
    assert all(d.count("±") == d.count(",") + 1 for d in differences)  # every difference has its error
    assert "evaluated on 1,300 of them, so each difference carries its binomial standard error" in table
    whole = comparison_table({**metrics, "val_images": 50_000}, "ILSVRC-2012")
    assert "(ILSVRC-2012, all 50,000 validation images)" in whole and "±" not in whole
    assert standard_error(45.0, 50_000) == 0.0
