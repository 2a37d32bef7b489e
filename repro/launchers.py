"""What the sweep launchers of conf/hydra/launcher/ need from repro: one GPU pair per job on a box with several
(`make ablations LAUNCHER=pairs`, docs/ablations.md).

`LAUNCHER=pairs` is hydra-submitit-launcher's local executor, which starts every job of a sweep at once, each in a
process of its own, and sets each job's CUDA_VISIBLE_DEVICES to the same GPUs, 0 to gpus_per_node - 1
(submitit/local/local.py: `LocalExecutor._submit_command`, `start_controller`). What is missing is the division:
the sweep's command records the GPUs it sees (`share_visible_gpus`), and job k of a sweep takes pair k mod P of
them, P = GPUs // 2, after the pair's earlier job has ended (`own_gpu_pair`). So 2P GPUs run P jobs at once, each
seeing only its own two GPUs (its towers' cuda:0 and cuda:1), and jobs k, k + P, k + 2P, ... run one after another
on the same pair. With fewer than four GPUs every job waits for pair 0: one job at a time on the GPUs the command
saw, as the basic launcher runs them. CUDA reads CUDA_VISIBLE_DEVICES once, when it starts in a process; a job
sets it before anything starts CUDA (counting GPUs through NVML, as `torch.cuda.device_count` does first, does
not start it: torch/cuda/__init__.py, `device_count`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import torch

SWEEP_GPUS = "REPRO_SWEEP_GPUS"  # the sweep command's GPUs, for its jobs (submitit replaces CUDA_VISIBLE_DEVICES)


def share_visible_gpus() -> None:
    """Record the GPUs this command sees (its CUDA_VISIBLE_DEVICES, or all of them) for the jobs it starts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ.setdefault(SWEEP_GPUS, visible if visible is not None else
                          ",".join(str(i) for i in range(torch.cuda.device_count())))


@contextlib.contextmanager
def own_gpu_pair(hydra_cfg):
    """In a job that submitit's local executor started: wait for the sweep's GPU pair of this job (`hydra.job.num`
    mod the pairs), then make it the only GPUs the job sees until it ends. Elsewhere (the basic launcher, SLURM,
    a single run) nothing changes."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or SWEEP_GPUS not in os.environ:
        yield
        return
    gpus = [gpu for gpu in os.environ[SWEEP_GPUS].split(",") if gpu]
    pairs = len(gpus) // 2
    pair = hydra_cfg.job.num % max(pairs, 1)
    with open(Path(hydra_cfg.sweep.dir) / f".gpu-pair-{pair}.lock", "a") as lock:
        print(f"job {hydra_cfg.job.num}: waiting for GPU pair {pair} of {max(pairs, 1)}", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the job ends, even when it is killed
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[2 * pair:2 * pair + 2] if pairs > 1 else gpus)
        print(f"job {hydra_cfg.job.num}: GPUs {os.environ['CUDA_VISIBLE_DEVICES'] or 'none'}", flush=True)
        yield
