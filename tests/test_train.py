"""Training runs: the run folder, exact resume after SIGKILL, clean stops, evaluation and the report."""

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from helpers import command, tiny_cfg
from repro.cli import report_main, resume_main, two_gpus_main
from repro.errors import RunError
from repro.distributed import World
from repro.loop import FlatLossWatch, StopSignals, Stopped
from repro.train import train


def repro_train(*args) -> list[str]:
    return command("repro-train", *args)


def test_run_folder_is_the_record(tiny_run):
    run_dir, result = tiny_run
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "checkpoints/last.pt",
                 "checkpoints/best.pt", "metrics.json", "report.md"):
        assert (run_dir / path).is_file(), path
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1_err_1crop", "top5_err_1crop", "top1_err_10crop", "top5_err_10crop"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["epoch"] == 2 and metrics["step"] == 8 and metrics["images_per_s"] > 0
    assert metrics["preset"] == "paper" and metrics["model_options"]["lrn"] is True
    assert metrics["data_options"]["batch_size"] == 4 and len(metrics["history"]) == 2
    ieee = {"float32_convolutions": "ieee", "float32_matmuls": "ieee", "autocast": "float32"}
    assert metrics["precision"] == ieee  # the arithmetic in force, in the metrics and the log alike
    log = (run_dir / "train.log").read_text()
    assert "precision: " + json.dumps(ieee) in log
    assert '"torch": "' in log and '"git_commit"' in log and "experiment" not in log.split("config:")[0]
    assert "batch_size: 4" in log  # the full config
    assert "epoch 1 (counted from 0; the 2012 notes count from 1: their epoch 2): lr conv1_weights 0.001," in log
    assert [entry["lr"] for entry in metrics["history"]] == [0.01, 0.001]  # tiny: lr /10 from epoch 1
    assert all("bias_lr" not in entry for entry in metrics["history"])  # the biases learn at the weights' rate
    assert "paper, Table 2, 1 CNN" in result.stdout  # the comparison table is printed at the end


def test_checkpoints_load_with_weights_only_and_hold_everything(tiny_run):
    run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "schedule", "epoch", "step", "global_step", "config"}
    assert "rng" not in checkpoint  # every draw is seeded by (seed, epoch, step): no generator state is needed
    assert checkpoint["global_step"] == 8 and checkpoint["schedule"]["finished"]
    velocities = [s["velocity"] for s in checkpoint["optimizer"]["state"].values()]
    assert len(velocities) == len(checkpoint["model"]) and any(v.abs().sum() > 0 for v in velocities)
    assert checkpoint["config"]["data"]["batch_size"] == 4


def test_tensorboard_has_the_promised_tags(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/top1_err", "lr", "perf/images_per_s", "val/top1_err_1crop",
            "val/top5_err_1crop", "val/top1_err_10crop_final", "filters/conv1_colour_specificity_tower0",
            "filters/conv1_colour_specificity_tower1"} <= scalars
    assert {"filters/conv1_tower0", "filters/conv1_tower1"} <= set(events.Tags()["images"])


def test_eval_entry_point_reproduces_the_final_metrics(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "eval.json"
    result = subprocess.run(command("repro-eval", f"checkpoint={run_dir}/checkpoints/last.pt", f"out={out}",
                                    "workers=0"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated, trained = json.loads(out.read_text()), json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["val_images"] == trained["val_images"] == 16  # the whole validation split, both times
    for key in ("top1_err_1crop", "top5_err_1crop", "top1_err_10crop", "top5_err_10crop"):
        assert evaluated[key] == trained[key], key
    assert evaluated["epoch"] == 2 and evaluated["preset"] == "paper"
    assert evaluated["decode"] == "loader"  # where the run decoded (a raw store: in the loader's workers)


def test_eval_refuses_to_decode_raw_records_on_a_gpu(tiny_run):
    from repro.config import composed
    from repro.evaluate import evaluate_checkpoint

    run_dir, _ = tiny_run
    with pytest.raises(RunError, match="data.decode=gpu decodes JPEG records, but the store .* holds raw records"):
        evaluate_checkpoint(composed("eval", [f"checkpoint={run_dir}/checkpoints/last.pt", "decode=gpu"]))


def test_report_command(tiny_run, capsys):
    run_dir, _ = tiny_run
    (run_dir / "report.md").unlink()
    assert report_main([f"run_dir={run_dir}"]) == 0
    report = (run_dir / "report.md").read_text()
    assert report == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| paper, Table 2, 1 CNN | – | – | 40.70 | 18.20 |" in report and "not comparable" in report
    assert "this run minus" not in report  # the demo data: no differences from ILSVRC-2012 numbers
    assert report_main([f"run_dir={run_dir.parent}"]) == 2 and "has not finished" in capsys.readouterr().err


# Two epochs of 6 steps (deterministic): the run that the interrupted ones below must end with exactly.
INTERRUPTED = ["experiment=tiny", "data.limit_train=24", "schedule.max_epochs=2"]


@pytest.fixture(scope="module")
def uninterrupted(demo_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(repro_train(*INTERRUPTED, f"data.store={demo_store}", f"hydra.run.dir={run_dir}"), check=True,
                   capture_output=True, timeout=600)
    return run_dir


def assert_same_run(a, b):
    """Two run folders ended with exactly the same weights, velocities and metrics."""
    a_checkpoint = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    b_checkpoint = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert a_checkpoint["global_step"] == b_checkpoint["global_step"] == 12
    for key in a_checkpoint["model"]:
        assert torch.equal(a_checkpoint["model"][key], b_checkpoint["model"][key]), key
    for i, state in a_checkpoint["optimizer"]["state"].items():
        assert torch.equal(state["velocity"], b_checkpoint["optimizer"]["state"][i]["velocity"])
    metrics_a = json.loads((a / "metrics.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    for key in ("top1_err_1crop", "top5_err_1crop", "top1_err_10crop", "top5_err_10crop", "history"):
        assert metrics_a[key] == metrics_b[key], key


def global_steps(run_dir) -> list[int]:
    """The global steps train.log has reported so far (6 steps an epoch)."""
    log = run_dir / "train.log"
    return [int(e) * 6 + int(s) for e, s in re.findall(r"epoch (\d+) step (\d+)/6", log.read_text() if log.exists()
                                                        else "")]


def test_killed_runs_resume_to_exactly_the_uninterrupted_weights(uninterrupted, demo_store, tmp_path):
    args = [*INTERRUPTED, f"data.store={demo_store}"]
    killed = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(3):
        process = subprocess.Popen(repro_train(*args, f"hydra.run.dir={killed}"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        target = rng.randint(1, 11)  # kill once the log shows at least this global step, at a random moment after
        deadline = time.time() + 300
        while process.poll() is None and time.time() < deadline:
            if max(global_steps(killed), default=0) >= target:
                time.sleep(rng.uniform(0.0, 1.5))
                break
            time.sleep(0.05)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 2, "the run finished before it could be killed twice"
    subprocess.run(repro_train(*args, f"hydra.run.dir={killed}"), check=True, capture_output=True, timeout=600)
    assert "resuming" in (killed / "train.log").read_text()
    assert_same_run(uninterrupted, killed)


def test_stop_signals_save_the_step_and_the_run_resumes_to_exactly_the_uninterrupted_weights(
        uninterrupted, demo_store, tmp_path):
    # Ctrl-C in the first epoch, then SIGTERM (SLURM's on preemption) in the second, each sent to the whole process
    # group as a terminal or SLURM does (a data worker included); no periodic checkpoint, so only the stop saves.
    args = [*INTERRUPTED, f"data.store={demo_store}", "data.workers=1", "log_every=1", "checkpoint_every=1000"]
    stopped = tmp_path / "stopped"
    for sig, target in ((signal.SIGINT, 2), (signal.SIGTERM, 8)):
        process = subprocess.Popen(repro_train(*args, f"hydra.run.dir={stopped}"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 300
        while process.poll() is None and max(global_steps(stopped), default=0) < target and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, sig)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 128 + sig, err[-3000:]
        assert "Traceback" not in err and not (stopped / "failed.json").exists()
        line = re.search(r"stopped by (\w+) at epoch (\d+) step (\d+) \(global step (\d+)\); (\S+) holds it", err)
        assert line and line[1] == sig.name and line[5] == str(stopped / "checkpoints" / "last.pt"), err[-3000:]
        checkpoint = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
        assert (checkpoint["epoch"], checkpoint["step"], checkpoint["global_step"]) == tuple(map(int, line.group(2, 3, 4)))
        assert target <= checkpoint["global_step"] < 12 and checkpoint["step"] not in (0, 6)  # mid-epoch: the stop's
    subprocess.run(repro_train(*args, f"hydra.run.dir={stopped}"), check=True, capture_output=True, timeout=600)
    assert_same_run(uninterrupted, stopped)


def test_a_stop_signal_is_recorded_then_handed_to_the_handler_that_was_there_before():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))  # e.g. a launcher's
    try:
        stop = StopSignals(["SIGUSR1", "SIGUSR2"])
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and got == []  # recorded only: the step goes on
        assert stop.requested(World(), at_window_end=False) == signal.SIGUSR1  # one process: after any step
        stop.restore()
        assert Stopped(signal.SIGUSR1, "").hand_over() == 128 + signal.SIGUSR1 and got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for signum, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        previous = signal.signal(signum, handler)  # Python's KeyboardInterrupt, the default death: not called
        try:
            assert Stopped(signum, "").hand_over() == 128 + signum
        finally:
            signal.signal(signum, previous)


def test_processes_under_torchrun_stop_together_at_a_window_end():
    class Rank1(World):  # rank 0 got the signal, rank 1 did not
        def gather(self, value):
            return [signal.SIGTERM, value]

    stop = StopSignals([])
    world = Rank1(rank=1, size=2, launched=True)
    assert stop.requested(world, at_window_end=False) is None  # the ranks compare only where they meet anyway
    assert stop.requested(world, at_window_end=True) == signal.SIGTERM


@pytest.mark.parametrize("name", ["SIGFOO", "SIGKILL", "sigterm"])
def test_a_stop_signal_that_cannot_be_caught_is_refused(name):
    with pytest.raises(RunError, match=f"stop_signals: '{name}' is not a signal a process can catch"):
        StopSignals([name])


def test_checkpoints_resume_with_any_number_of_gpus(demo_store, tmp_path, monkeypatch):
    # Checkpoints used to carry every visible GPU's generator state and restore them all: from a 4-GPU box (or
    # rank 0 under DDP) a resume on 2 GPUs ran into torch.cuda.default_generators[2]. No generator state is needed.
    train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1"))
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["rng"] = {"torch": torch.get_rng_state(), "cuda": [torch.get_rng_state()] * 4}  # the old format
    checkpoint["schedule"]["finished"] = False  # as if killed after the first epoch's checkpoint, with more to go
    torch.save(checkpoint, path)
    (tmp_path / "metrics.json").unlink()

    def untouchable(*args):
        raise AssertionError("a run must not read or restore the CUDA generators")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)  # for the environment record
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", untouchable)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", untouchable)
    metrics = train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=2", "devices=[cpu,cpu]"))
    assert metrics["epoch"] == 2 and metrics["step"] == 8


@pytest.mark.parametrize("gpus", [0, 1])
def test_repro_gpus_refuses_fewer_than_two_gpus_with_trainings_message(gpus, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert two_gpus_main([]) == 2
    error = capsys.readouterr().err
    assert error.startswith("repro-gpus: error: this experiment is the paper's two-GPU setting and needs two GPUs, "
                            f"but {gpus} {'is' if gpus == 1 else 'are'} visible") and "devices=[cpu,cpu]" in error


def test_repro_gpus_names_the_two_gpus(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU model {i}")
    assert two_gpus_main([]) == 0
    assert capsys.readouterr().out.strip() == "2 GPUs: GPU model 0, GPU model 1"


def test_paper_experiment_refuses_one_device_unless_told(demo_store, tmp_path):
    result = subprocess.run(repro_train("experiment=paper", f"data.store={demo_store}", f"hydra.run.dir={tmp_path}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "needs two GPUs" in result.stderr and "devices=[cpu,cpu]" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_store_is_explained(tmp_path):
    result = subprocess.run(repro_train("experiment=tiny", f"data.store={tmp_path / 'nowhere'}",
                                        f"hydra.run.dir={tmp_path / 'run'}"), capture_output=True, text=True)
    assert result.returncode == 2 and "not a complete prepared store" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_finite_loss_stops_cleanly_keeping_the_last_good_checkpoint(demo_store, tmp_path):
    cfg = tiny_cfg(demo_store, tmp_path, "optim.lr=1e12", "checkpoint_every=1", "log_every=1")
    with pytest.raises(RunError, match="the loss became (nan|inf).*last good checkpoint"):
        train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_resume_refuses_a_different_model(demo_store, tmp_path):
    train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1"))
    with pytest.raises(RunError, match="different settings \\(model.lrn"):
        train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=2", "model.lrn=false"))


@pytest.mark.parametrize("override, message", [("data.batch_size=0", "data.batch_size=0: must be at least 1"),
                                               ("model.towers=3", "towers=3 is not one of"),
                                               ("data.crop_chunk=16", "crop_chunk")])
def test_bad_values_stop_with_a_message(demo_store, tmp_path, override, message):
    with pytest.raises(RunError, match=message):
        train(tiny_cfg(demo_store, tmp_path, override))


def test_training_batches_are_shuffled_with_the_configured_workers(demo_store, tmp_path, monkeypatch):
    import inspect

    import repro.loop as train_module

    calls, real = [], train_module.batches

    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "batches", spy)
    train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1", "data.workers=0"))
    training = [c for c in calls if c.get("shuffle", True)]
    assert training and all(c["workers"] == 0 and c["epoch"] == 0 for c in training)


def test_a_bias_rate_of_its_own_is_logged_beside_the_weights_rate(demo_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1", "optim.bias_lr=0.02"))
    assert metrics["history"][0]["lr"] == 0.01 and metrics["history"][0]["bias_lr"] == 0.02
    log = (tmp_path / "train.log").read_text()
    assert ("epoch 0 (counted from 0; the 2012 notes count from 1: their epoch 1): lr conv1_weights 0.01, "
            "conv1_biases 0.02, weights 0.01, biases 0.02") in log
    assert re.search(r"epoch 0 step \d+/\d+ .* lr 1e-02 bias_lr 2e-02 ", log)
    scalars = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert {"lr", "bias_lr"} <= set(scalars)


def test_flat_loss_warning_names_the_cause():
    watch = FlatLossWatch(classes=1000, patience=2000)
    assert watch.update(6.9078, 1000) is None
    assert watch.update(5.0, 1000) is None  # left the plateau: the count starts again
    assert watch.update(6.90, 1000) is None
    message = watch.update(6.91, 1000)
    assert message and "ln(1000)" in message and "init_bias=0.1" in message
    assert watch.update(6.91, 1000) is None  # once


def test_resume_command_composes_the_runs_own_overrides(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert resume_main([f"run_dir={run_dir}"]) == 0  # finished already: it reloads, finds the metrics, reports
    assert "paper, Table 2, 1 CNN" in capsys.readouterr().out
    assert resume_main([f"run_dir={run_dir.parent}"]) == 2
    assert "is not a repro-train run folder" in capsys.readouterr().err


@pytest.mark.slow  # two runs of a minute on the loaded 2-core machine
def test_a_run_resumed_in_a_process_with_another_thread_count_ends_with_the_uninterrupted_weights(
        uninterrupted, demo_store, tmp_path):
    """CPU results depend on the thread count (conv1's weight gradient), which a process takes from its CPU affinity
    or OMP_NUM_THREADS: a deterministic run keeps the count it started with (docs/reliability.md)."""
    args = repro_train(*INTERRUPTED, f"data.store={demo_store}", f"hydra.run.dir={tmp_path}")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while process.poll() is None and max(global_steps(tmp_path), default=0) < 4 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    threads = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["threads"]
    if threads == 1:
        pytest.skip("the run had one CPU thread, and OMP_NUM_THREADS gives no more than the cores")
    subprocess.run(args, check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert f"deterministic=true: {threads} CPU threads" in (tmp_path / "train.log").read_text()
    assert_same_run(uninterrupted, tmp_path)


def test_a_run_reads_a_jpeg_store_for_training_and_evaluation(demo_jpeg_store, tmp_path):
    """The quick sibling of the next test: a run's splits of a JPEG store, a training batch through the
    augmentation and a centre-crop evaluation."""
    from repro.data import batches, step_rng
    from repro.evaluate import evaluate
    from repro.run import Run

    run = Run(tiny_cfg(demo_jpeg_store, tmp_path))
    assert run.records["format"] == "jpeg" and run.decode_on is None
    images, labels = next(iter(batches(run.train_split, 4, workers=0)))
    (x, _) = run.augment.train(images, step_rng(0, 0, 0))
    assert images.dtype == torch.uint8 and x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()
    result = evaluate(run.model, run.augment, run.val_split, 8, ten_crop=False)
    assert result["images"] == len(run.val_split) == 8


@pytest.mark.slow
def test_a_jpeg_store_trains_and_evaluates_like_a_raw_one(demo_store, demo_jpeg_store, tmp_path):
    """Training and `repro-eval` read either record format (the JPEG records decoded in the loader)."""
    from repro.config import composed
    from repro.evaluate import evaluate_checkpoint

    metrics = train(tiny_cfg(demo_jpeg_store, tmp_path / "run", "schedule.max_epochs=1"))
    assert metrics["store_records"]["format"] == "jpeg" and metrics["val_images"] == 8
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    for store in (demo_jpeg_store, demo_store):
        evaluated = evaluate_checkpoint(composed("eval", [f"checkpoint={checkpoint}", f"store={store}", "workers=0",
                                                          f"out={tmp_path / 'eval.json'}"]))
        assert evaluated["val_images"] == 16 and 0 <= evaluated["top1_err_10crop"] <= 100
