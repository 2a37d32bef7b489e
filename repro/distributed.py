"""Many boxes: one process per pair of devices under `torchrun`, DistributedDataParallel over the two-tower model.

torchrun tells each process its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE);
without it a run is one process, rank 0 of 1, and nothing here talks to anyone. `data.batch_size` stays the
global batch of one step (the paper's 128); each rank takes its own slice of every global batch (repro/data.py),
so the union over ranks of step s is the single-process batch of step s, and DDP's averaged gradient of the
per-rank mean losses is the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from repro.errors import RunError
from repro.runtime import resolve_devices, use_devices

# A rank waits this long for the others (rank 0 alone writing a 455 MB checkpoint, a slow evaluation shard).
TIMEOUT = timedelta(minutes=30)

# What gloo and NCCL say when the process at the other end of a collective is gone: its connections closed or reset
# (gloo: "Connection closed by peer [10.0.0.2]:41234", "Connection reset by peer", "Broken pipe"; NCCL: "remote
# process exited or there was a network error").
PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exited")
PF_EXITING = 0x4  # a /proc/PID/stat flag: set as a process starts to exit, before the kernel closes its sockets


def alive(pid: int) -> bool:
    """Whether the process `pid` on this machine is running: not gone, not a zombie, not exiting (a peer's sockets
    are closed while it exits, so a collective can fail before the process is a zombie)."""
    if not Path("/proc/self/stat").exists():
        return True  # no /proc to ask: not known to be dead
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return state not in ("Z", "X") and not int(fields[5]) & PF_EXITING
    except (OSError, IndexError, ValueError):
        return False


@dataclass(frozen=True)
class World:
    """This process's place among those torchrun started: `rank` of `size` in all, `local_rank` of `local_size`
    on this node. `launched` is False for a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls) -> "World":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        except ValueError as error:
            raise RunError(f"the torchrun environment is malformed ({error}); start the run with torchrun") from None
        return cls(rank, size, local_rank, local_size, launched=True)

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run folder: train.log, TensorBoard, checkpoints, metrics.json, report.md."""
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """Each rank's share of the global batch `data.batch_size`."""
        if batch_size % self.size:
            raise RunError(f"data.batch_size={batch_size} is the global batch of one step, split evenly between "
                           f"the {self.size} processes, but {self.size} does not divide it; choose a multiple of "
                           f"{self.size} (the paper's 128 divides by 1, 2, 4, 8, ...)")
        return batch_size // self.size

    def devices(self, requested, require_two_gpus: bool) -> list[str]:
        """The two towers' devices of this process. Under torchrun local rank r owns cuda:2r and cuda:2r+1 (or
        cpu, cpu without GPUs); CUDA devices named in `devices` would be the same for every rank, so they are
        refused (CUDA_VISIBLE_DEVICES chooses which GPUs a node uses)."""
        if not self.launched:
            return resolve_devices(requested, require_two_gpus)
        if requested is not None:
            devices = resolve_devices(requested, require_two_gpus=False)
            if any(torch.device(d).type == "cuda" for d in devices):
                raise RunError(f"devices={devices}: under torchrun each process takes its own pair of GPUs (local "
                               "rank r: cuda:2r and cuda:2r+1); leave devices unset (set CUDA_VISIBLE_DEVICES to "
                               "choose a node's GPUs), or use devices=[cpu,cpu]")
            return devices
        gpus = torch.cuda.device_count()
        if gpus == 0:
            return resolve_devices(None, require_two_gpus)  # cpu, cpu (or the paper's "needs two GPUs")
        if gpus < 2 * self.local_size:
            fix = (f"use --nproc_per_node {gpus // 2} (make train-ddp NPROC={gpus // 2})" if gpus >= 2 else
                   "run without torchrun (devices=[cuda:0,cuda:0] puts both towers on the one GPU)")
            raise RunError(f"torchrun started {self.local_size} processes on this node and each needs two GPUs "
                           f"(one per tower), {2 * self.local_size} in all, but {gpus} are visible; {fix}")
        return [f"cuda:{2 * self.local_rank}", f"cuda:{2 * self.local_rank + 1}"]

    def start(self, backend: str | None, requested_devices=None, require_two_gpus: bool = False) -> None:
        """Join the process group, after making this process's first GPU (of `devices(requested_devices, ...)`) the
        current device: with a NCCL backend alone (`dist_backend=nccl`) the object collectives run on the current
        device, GPU 0 for every process of a box otherwise, which NCCL refuses. `backend` null: gloo for CPU tensors
        and NCCL for CUDA ones (PyTorch sends each collective to the backend of its tensors' device)."""
        if not self.launched or dist.is_initialized():
            return
        use_devices(self.devices(requested_devices, require_two_gpus))
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as error:
            raise RunError(f"could not join the other processes with backend {backend!r} ({error}); check "
                           "dist_backend and torchrun's --rdzv-endpoint, and across boxes the interface they talk on: "
                           "gloo listens on the address this host's name resolves to (127.0.1.1 in Ubuntu's default "
                           "/etc/hosts reaches no other box), so set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the "
                           "boxes' shared interface (e.g. eth0) on every box (docs/many-boxes.md)") from None

    def stop(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()

    def share(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.launched:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.launched:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def members(self) -> list[tuple[str, int]]:
        """Every rank's (host, pid), in rank order: who to name when one of them dies (`lost_peer`)."""
        return self.gather((socket.gethostname(), os.getpid()))

    def lost_peer(self, error: BaseException, members: list[tuple[str, int]]) -> str | None:
        """What happened when `error` is a collective failing because another process of the run died (which one,
        where it ran on this machine), else None."""
        said = PEER_LOST.search(str(error)) if self.launched and isinstance(error, RuntimeError) else None
        if said is None:
            return None
        here = socket.gethostname()
        peers = [(rank, pid) for rank, (host, pid) in enumerate(members) if rank != self.rank and host == here]
        deadline = time.monotonic() + 2  # a peer that stopped on an error of its own may still be ending
        while True:
            gone = [f"rank {rank} (pid {pid})" for rank, pid in peers if not alive(pid)]
            if gone or not peers or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if gone:
            return (f"another process of this run died: {', '.join(gone)} on {here} ended (killed, e.g. by the "
                    "out-of-memory killer, or failed: its own output says why)")
        return (f"another process of this run died or closed its connection (none on {here} has ended, so one on "
                f"another machine, or one that stopped on an error of its own: the other processes' output says "
                f"which; the collective said \"{said[0]}\")")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (on its own device: gloo on the CPU, NCCL on a GPU)."""
        if self.launched:
            dist.all_reduce(tensor)
        return tensor

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model for training steps: under torchrun in DistributedDataParallel, which averages the gradients
        over the ranks during backward. The towers span two devices, so `device_ids` must be None. The model's
        buffers are constants (the LRN's band matrices), so DDP's default broadcast of every buffer before every
        forward pass (collectives and a sync point per step) is turned off: `forward_sync_buffers` in torch 2.14
        and newer, which deprecated `broadcast_buffers` (the same switch in older versions)."""
        if not self.launched:
            return model
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            return DistributedDataParallel(model, device_ids=None, forward_sync_buffers=False)
        return DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
