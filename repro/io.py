"""Small file helpers of every stage: atomic writes through unique temporaries, a folder lock, free space and the
cores this process may use, JSON, and nested settings as dotted keys."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from repro.errors import DiskFullError, FolderBusyError, RunError

LOCK = ".lock"  # the lock file of a locked folder (left in place: removing it would race with a new holder)
_held: dict[str, int] = {}  # the folders this process has locked -> the lock file's descriptor


def human(size: float) -> str:
    """A byte count for people (powers of 1000, as disks are sold)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


def free_space(folder: Path) -> int:
    """Bytes free for this user on the disk of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def available_cores() -> int:
    """the cores this process may use"""  # its CPU affinity: a SLURM job's, a container's or taskset's share
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it arose from (torch.save wraps the OSError in a RuntimeError), is ENOSPC."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def temporary(path: Path) -> Path:
    """A name of its own beside `path` for a file being written (two writers never share one); `remove_temporaries`
    finds the ones a killed process left."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_temporaries(folder: Path) -> None:
    """Delete the temporaries that killed writers left under `folder` (call it holding the folder's lock)."""
    for path in Path(folder).rglob(".*.tmp"):
        path.unlink(missing_ok=True)


def atomic_write(path: Path, write, keep: Path | None = None) -> None:
    """Write through a temporary file and rename, so `path` is either absent or complete. With `keep`, the file
    it replaces is renamed to `keep` instead of deleted. A failed write removes its temporary; on a full disk it
    raises DiskFullError saying what is free."""
    tmp = temporary(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if disk_full(error):
            raise DiskFullError(f"disk full: {path} could not be written ({human(free_space(path.parent))} free "
                                f"on its disk)") from None
        raise


def make_folder(path: Path, key: str) -> None:
    """Make the folder `path` that the setting `key` names (with its parents), or say in one line why not."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a file where a folder of the path should be
        raise RunError(f"{key}={path}: cannot make this folder ({error.strerror}: {error.filename}); give another "
                       f"{key}") from None


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


@contextlib.contextmanager
def locked(folder: Path, what: str):
    """Hold an exclusive lock on `folder` (a run folder, a store) inside the `with`; `what` says who holds it (e.g.
    "training run"). The OS drops the lock when the process ends, however it ends. Another process is refused at
    once with FolderBusyError naming the holder (pid, host, start time); a folder this process already holds may
    be locked again (the inner `with` does nothing)."""
    key = str(Path(folder).resolve())
    if key in _held:
        yield
        return
    fd = os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderBusyError(f"{folder} is in use by {holder}: wait for it to end (or stop it), or use another "
                              "folder") from None
    try:  # who holds it, for the message above (best effort: a full disk may refuse even this)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (a {what}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
    except OSError:
        pass
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} as {"a.b": 1}: nested settings under the keys the command line uses."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
