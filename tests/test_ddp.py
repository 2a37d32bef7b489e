"""Many boxes on one CPU: torchrun processes with the gloo backend, DDP over the two-tower model (cpu, cpu)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import command, tiny_cfg
from repro.config import build_model
from repro.data import Augment, batches, step_rng
from repro.distributed import World
from repro.errors import RunError
from repro.store import PreparedStore
from repro.train import train

# Two steps of the global batch of 4 (2 processes x 2 images), a checkpoint after each. Dropout off: each rank
# draws its own masks, so only without dropout do two processes compute exactly what one does (docs/many-boxes.md).
ARGS = ["experiment=tiny", "data.limit_train=8", "schedule.max_epochs=1", "checkpoint_every=1",
        "model.dropout=false"]


def torchrun(*args) -> list[str]:
    """Two processes on this machine; --standalone rendezvouses on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *command("repro-train", *args)]


@pytest.fixture(scope="module")
def two_process_run(demo_store, tmp_path_factory):
    """A finished two-process run in a folder named by the time to the microsecond, so that each process's Hydra
    would pick a folder of its own; the run folder is the one rank 0 picked."""
    cwd = tmp_path_factory.mktemp("ddp_cwd")
    result = subprocess.run(torchrun(*ARGS, f"data.store={demo_store}", "hydra.run.dir=runs/${now:%H-%M-%S-%f}"),
                            cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_rank_0_alone_writes_one_run_folder(two_process_run):
    cwd, result = two_process_run
    assert [p.name for p in cwd.iterdir()] == ["runs"]  # nothing else, e.g. no folder of rank 1's own
    (run_dir,) = (cwd / "runs").iterdir()
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("tb/")] == [
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".lock", "checkpoints/best.pt",
        "checkpoints/last.prev.pt", "checkpoints/last.pt", "metrics.json", "report.md", "train.log"]
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))  # .<time>.<host>.<pid>.<n>: one process's
    assert events and len({e.name.split(".")[-2] for e in events}) == 1
    log = (run_dir / "train.log").read_text()
    assert log.count(" starting ") == 1 and log.count("finished:") == 1
    assert "effective batch 4 (2 processes x 2), lr 0.01" in log
    assert "hydra.output_subdir" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # rank 0's own
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["effective_batch"], metrics["processes"], metrics["batch_per_process"]) == (4, 2, 2)
    assert metrics["val_images"] == 8 and metrics["step"] == 2  # each rank evaluated 4; the counts were summed
    assert result.stdout.count("paper, Table 2, 1 CNN") == 1  # the report, printed by rank 0 only


def test_two_processes_take_the_step_one_process_takes_on_the_combined_batch(two_process_run, demo_store, tmp_path):
    cwd, _ = two_process_run
    (run_dir,) = (cwd / "runs").iterdir()
    train(tiny_cfg(demo_store, tmp_path, *ARGS))  # one process, batches of 4
    two = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert two["global_step"] == one["global_step"] == 2
    # Not bit-equal: the gradient is the mean of two 2-image means instead of one 4-image mean, and the
    # convolutions sum over the batch in another order, so float32 rounding differs. The velocity (lr x gradient,
    # accumulated) agrees to 1e-5 of its largest element, and each weight's movement from the initial weights to
    # 1e-5 of the largest movement plus two units of float32 rounding of the weight (measured: 2e-6 for both).
    torch.manual_seed(one["config"]["seed"])  # the initial weights, as the run drew them
    initial = build_model(one["config"]["model"]).state_dict()
    eps = torch.finfo(torch.float32).eps
    for i, key in enumerate(one["model"]):
        v_two, v_one = two["optimizer"]["state"][i]["velocity"], one["optimizer"]["state"][i]["velocity"]
        moved = (one["model"][key] - initial[key]).abs().max()
        assert v_one.abs().max() > 0 and moved > 0, key
        torch.testing.assert_close(v_two, v_one, rtol=0, atol=1e-5 * v_one.abs().max(), msg=key)
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=2 * eps, atol=1e-5 * moved, msg=key)


def parent(pid: int) -> int | None:
    """The parent process of `pid` (from /proc), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.slow  # two more two-process runs: about a minute and a half on the loaded 2-core machine
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(two_process_run, demo_store, tmp_path):
    cwd, _ = two_process_run
    (reference,) = (cwd / "runs").iterdir()
    run_dir = tmp_path / "run"
    command = torchrun(*ARGS, f"data.store={demo_store}", f"hydra.run.dir={run_dir}")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    last, deadline = run_dir / "checkpoints" / "last.pt", time.time() + 600
    while process.poll() is None and not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before its first checkpoint"
    # torchrun starts each worker in a session of its own: kill the workers and torchrun's group, as a crash would
    workers = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and parent(int(pid)) == process.pid]
    os.killpg(process.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert len(workers) == 2
    assert "finished" not in (run_dir / "train.log").read_text()

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resuming \S+ at epoch 0 step 1\n", (run_dir / "train.log").read_text())
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2
    for i, key in enumerate(a["model"]):
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["optimizer"]["state"][i]["velocity"], b["optimizer"]["state"][i]["velocity"]), key
    metrics_a = json.loads((reference / "metrics.json").read_text())
    metrics_b = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1_err_1crop", "top5_err_1crop", "top1_err_10crop", "top5_err_10crop", "history"):
        assert metrics_a[key] == metrics_b[key], key


def test_a_global_batch_the_processes_cannot_share_is_refused(demo_store, tmp_path):
    result = subprocess.run(torchrun("experiment=tiny", f"data.store={demo_store}", "data.batch_size=3",
                                     f"hydra.run.dir={tmp_path}"), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "data.batch_size=3 is the global batch of one step, split evenly between the 2 processes" in result.stderr


@pytest.mark.parametrize("crop_chunk", [1, 32])
def test_the_ranks_slices_of_a_step_are_the_one_process_batch(demo_store, crop_chunk):
    store = PreparedStore(demo_store)
    split, stats = store.split("train"), store.stats()
    augment = Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"], crop_chunk=crop_chunk)
    whole = list(batches(split, 8, seed=3, epoch=1, start_step=2, workers=0))
    shards = [list(batches(split, 8, seed=3, epoch=1, start_step=2, workers=0, shard=(r, 4))) for r in range(4)]
    assert len(whole) == len(shards[0]) == len(split) // 8 - 2
    for step, (images, labels) in enumerate(whole):
        parts = [shard[step] for shard in shards]
        assert all(len(p[0]) == 2 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
        x = augment.train(images, step_rng(3, 1, step))[0]
        x_parts = [augment.train(p[0], step_rng(3, 1, step), (r, 4))[0] for r, p in enumerate(parts)]
        torch.testing.assert_close(torch.cat(x_parts), x, rtol=0, atol=1e-4)  # the same crops, flips and noise
        assert not torch.allclose(x_parts[3], augment.train(parts[3][0], step_rng(3, 1, step))[0])  # not the default


def test_the_ranks_validation_shares_cover_the_split_once(demo_store):
    split = PreparedStore(demo_store).split("val")
    shares = [split.part(r, 3).rows for r in range(3)]
    assert np.array_equal(np.concatenate(shares), split.rows)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_local_rank_owns_a_pair_of_gpus(monkeypatch):
    rank1 = World(rank=3, size=4, local_rank=1, local_size=2, launched=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank1.devices(None, require_two_gpus=True) == ["cuda:2", "cuda:3"]
    assert World(rank=2, size=4, local_rank=0, local_size=2, launched=True).devices(None, False) == ["cuda:0",
                                                                                                    "cuda:1"]
    assert rank1.devices(["cpu", "cpu"], False) == ["cpu", "cpu"]
    with pytest.raises(RunError, match=r"each process takes its own pair of GPUs .* cuda:2r and cuda:2r\+1"):
        rank1.devices(["cuda:0", "cuda:1"], False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(RunError, match="needs two GPUs .* 4 in all, but 3 are visible; use --nproc_per_node 1"):
        rank1.devices(None, False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert rank1.devices(None, False) == ["cpu", "cpu"]
    with pytest.raises(RunError, match="needs two GPUs"):
        rank1.devices(None, require_two_gpus=True)


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World() and World().main and not World().launched
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    world = World.from_env()
    assert world == World(rank=5, size=8, local_rank=1, local_size=4, launched=True) and not world.main
    assert world.local_batch(128) == 16
    with pytest.raises(RunError, match="data.batch_size=100 is the global batch .* 8 does not divide it"):
        world.local_batch(100)


def test_the_ddp_wrapper_does_not_broadcast_the_constant_buffers(tmp_path):
    # DDP broadcasts every buffer before every forward by default: here the LRN's constant band matrices.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = build_model({"num_classes": 4})
        net = World(launched=True).wrap(model)
        assert isinstance(net, DistributedDataParallel) and net.broadcast_buffers is False  # any torch version
    finally:
        dist.destroy_process_group()


class DeviceSet(Exception):
    """Raised by the fake `torch.cuda.set_device`: the command under test has set its device, nothing more is run."""


@pytest.fixture
def four_fake_gpus(monkeypatch):
    """torch.cuda with four GPUs as far as counting goes; `set_device` records its device and stops the command, and
    `init_process_group` records its backend (nothing initialises CUDA or joins a group)."""
    calls = []

    def set_device(device):
        calls.append(("set_device", str(torch.device(device))))
        raise DeviceSet

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init_process_group", backend)))
    return calls


def test_a_process_sets_its_gpu_before_it_joins_the_group(four_fake_gpus, monkeypatch):
    # dist_backend=nccl: the object collectives run on the current device, GPU 0 for every local rank unless set
    world = World(rank=3, size=4, local_rank=1, local_size=2, launched=True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: four_fake_gpus.append(("set_device", str(device))))
    world.start("nccl")
    assert four_fake_gpus == [("set_device", "cuda:2"), ("init_process_group", "nccl")]
    four_fake_gpus.clear()
    world.start(None, ["cpu", "cpu"])  # a CPU pair: no GPU to set
    assert [call for call, _ in four_fake_gpus] == ["init_process_group"]


def test_every_command_that_uses_cuda_makes_its_first_device_current(four_fake_gpus, demo_store, tmp_path,
                                                                      capsys):
    # Unset, the pin-memory thread and tensor.pin_memory() work on cuda:0, whatever devices the command was given.
    from repro.cli import figure1_main, figures_main, preflight_main
    from repro.config import composed
    from repro.evaluate import evaluate_checkpoint

    checkpoint = tmp_path / "last.pt"
    checkpoint.touch()
    commands = {
        "repro-train": lambda: train(tiny_cfg(demo_store, tmp_path / "run", "devices=[cuda:3,cuda:2]")),
        "repro-eval": lambda: evaluate_checkpoint(composed("eval", [f"checkpoint={checkpoint}",
                                                                    "devices=[cuda:3,cuda:2]"])),
        "repro-figures": lambda: figures_main([f"checkpoint={checkpoint}", "devices=[cuda:3,cuda:2]"]),
        "repro-preflight": lambda: preflight_main(["devices=[cuda:3,cuda:2]", f"out={tmp_path}"]),
        "repro-figure1": lambda: figure1_main([f"data={tmp_path}", "device=cuda:3", f"out={tmp_path}"]),
    }
    for name, run in commands.items():
        four_fake_gpus.clear()
        with pytest.raises(DeviceSet):
            run()
        assert four_fake_gpus == [("set_device", "cuda:3")], name


def test_a_failure_to_join_names_the_network_interface(monkeypatch):
    # Two boxes: gloo listens on the address the host's name resolves to (127.0.1.1 in Ubuntu's /etc/hosts)
    def refused(backend, **kwargs):
        raise RuntimeError("[enforce fail at gloo/transport/tcp/pair.cc] connectFullMesh failed")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", refused)
    with pytest.raises(RunError, match="connectFullMesh failed.*GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME"):
        World(rank=2, size=4, local_rank=0, local_size=2, launched=True).start(None, ["cpu", "cpu"])


def rank_of(pid: int) -> int | None:
    """The torchrun rank of process `pid` (its RANK environment variable), or None."""
    try:
        environment = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
    except OSError:
        return None
    return int(environment["RANK"]) if "RANK" in environment else None


@pytest.mark.slow  # a two-process run until its first checkpoint: 8 s on the loaded 2-core machine
def test_a_dead_peer_is_named_by_rank_0_which_says_the_same_command_resumes(demo_store, tmp_path):
    run_dir = tmp_path / "run"
    command = torchrun("experiment=tiny", "data.limit_train=16", "schedule.max_epochs=100", "checkpoint_every=1",
                       "model.dropout=false", f"data.store={demo_store}", f"hydra.run.dir={run_dir}")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        last, deadline = run_dir / "checkpoints" / "last.pt", time.time() + 600
        while process.poll() is None and not last.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before its first checkpoint"
        (rank1,) = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and parent(int(pid)) == process.pid
                    and rank_of(int(pid)) == 1]
        os.kill(rank1, signal.SIGKILL)  # as the out-of-memory killer would
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    error = json.loads((run_dir / "failed.json").read_text())["error"]
    assert error.startswith(f"another process of this run died: rank 1 (pid {rank1}) on ") and "by peer" not in error
    assert re.search(r"; this process stopped too, and \S+last.pt \(step \d+\) is intact: run the same command "
                     r"\(every process\) to resume$", error)
    assert f"repro-train (rank 0): error: {error}" in stderr
