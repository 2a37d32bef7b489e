"""Training (§5): `train(cfg)` trains (or resumes) the run `cfg` describes into its run folder and returns the
final metrics. `repro.cli` holds the `repro-train` entry point around it.

The run folder is the record: `.hydra/` (config), `train.log`, `tb/` (TensorBoard), `checkpoints/last.pt`
(`last.prev.pt`, the one before) and `best.pt`, `metrics.json` (and `report.md`, written by the entry point). Running
the same command with the same `hydra.run.dir` resumes from `last.pt`; with `deterministic=true` a resumed run ends
with exactly the weights of an uninterrupted one. A run locks its folder (`.lock`) for its life: a second process
there is refused (docs/reliability.md). Under torchrun every process runs `train`, each on its slice of the global batch, with DDP
(repro/distributed.py); rank 0 alone writes the run folder.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from repro import speed
from repro.config import augment_options
from repro.distributed import World
from repro.errors import ReproError, RunError
from repro.evaluate import PAPER_METRICS
from repro.io import flatten, locked, make_folder, remove_temporaries, write_json
from repro.loop import Loop
from repro.run import Run, saved_checkpoint
from repro.runtime import environment

log = logging.getLogger("repro")


def attach_log_file(path: Path) -> logging.Handler:
    """train.log: every line of the run, progress lines included."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


class NoWriter:
    """What ranks other than 0 get instead of a SummaryWriter: the same calls, and no files."""

    def __enter__(self) -> "NoWriter":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def train(cfg: DictConfig, on_accept: Callable[[], None] | None = None) -> dict:
    """Train (or resume) the run `cfg` describes, in `cfg.run_dir`; return its final metrics (also written to
    metrics.json). Raises RunError or StoreError with an explanation when something must be fixed first.
    Under torchrun every process calls it; they share rank 0's run folder, and only rank 0 writes to it.

    A folder that holds a run (a checkpoint) changes only once this command is accepted for it (its settings are
    the checkpoint's, the checkpoint is intact): a refused command leaves the run as it was, but for the lock file.
    `on_accept` (rank 0, holding the lock) writes the command's own record into the folder then, e.g. Hydra's
    `.hydra/`; a new folder gets it at once, so that a run failing at its start is recorded with its error."""
    world = World.from_env()
    world.start(cfg.dist_backend, cfg.devices, cfg.require_two_gpus)
    try:
        members = world.members()  # to name a process that dies
        cfg.run_dir = world.share(cfg.run_dir)  # rank 0's: Hydra's ${now} folder name can differ between processes
        if not cfg.run_dir:
            raise RunError("run_dir is not set (the repro-train entry point sets it to Hydra's output folder)")
        if not world.main:
            log.setLevel(logging.ERROR)  # rank 0 logs for everyone
            return _train(Run(cfg, world), members)
        run_dir = Path(cfg.run_dir)
        make_folder(run_dir, "run_dir")
        with locked(run_dir, "training run"):  # for the run's life: a second process on this folder is refused
            return _logged(cfg, world, run_dir, members, on_accept)
    finally:
        world.stop()


def _logged(cfg: DictConfig, world: World, run_dir: Path, members: list, on_accept) -> dict:
    """Rank 0's run, in train.log once accepted; a failure after that also goes to failed.json (what a sweep's
    summary reports)."""
    log.setLevel(logging.INFO)
    pending = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    log.addHandler(pending)  # the lines before the run is accepted, for train.log
    handler = None

    def accept() -> None:
        nonlocal handler
        remove_temporaries(run_dir)  # what a killed run was writing
        (run_dir / "failed.json").unlink(missing_ok=True)  # from an earlier attempt that this one replaces
        if on_accept:
            on_accept()
        handler = attach_log_file(run_dir / "train.log")
        pending.setTarget(handler)
        log.removeHandler(pending)
        pending.close()  # flushed into train.log

    try:
        resuming = saved_checkpoint(run_dir / "checkpoints") is not None
        if not resuming:
            accept()
        run = Run(cfg, world)  # a resume is refused here, before anything of its folder changes
        if resuming:
            accept()
        return _train(run, members)
    except Exception as error:
        if handler is None:  # refused: the folder stays as it was
            raise
        message = str(error) if isinstance(error, ReproError) else f"{type(error).__name__}: {error}"
        handler.handle(logging.makeLogRecord({"msg": f"stopped: {message}", "levelno": logging.ERROR,
                                              "levelname": "ERROR", "name": log.name}))  # the console gets the error
        try:
            write_json(run_dir / "failed.json", {"error": message})
        except (OSError, ReproError):  # e.g. the disk is full: the error itself says what matters
            pass
        raise
    finally:
        log.removeHandler(pending)
        pending.close()  # refused: its lines are dropped (the console had them)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _train(run: Run, members: list) -> dict:
    """`run`'s epochs and final evaluation; a collective that fails because another process died says so."""
    try:
        return _epochs(run)
    except RuntimeError as error:
        lost = run.world.lost_peer(error, members)
        if lost is None:
            raise
        saved = (f"{run.checkpoints / 'last.pt'} (step {run.last_saved_step}) is intact"
                 if run.last_saved_step is not None else "no checkpoint had been written yet")
        raise RunError(f"{lost}; this process stopped too, and {saved}: run the same command (every process) to "
                       "resume") from None


def _epochs(run: Run) -> dict:
    cfg, world = run.cfg, run.world
    log.info(("resuming " if run.resumed else "starting ") + f"{run.dir} at epoch {run.epoch} step {run.step}")
    log.info("environment: " + json.dumps(environment(run.devices)))
    log.info("precision: " + json.dumps(speed.precision(cfg.speed)))
    log.info("config:\n" + OmegaConf.to_yaml(cfg))
    log.info(f"{len(run.train_split)} training and {len(run.val_split)} validation images, "
             f"{run.steps_per_epoch} steps per epoch, devices {run.devices}, {run.workers} loader processes, "
             f"{run.threads} CPU threads")
    log.info(f"effective batch {cfg.data.batch_size} ({world.size} process{'es' if world.size > 1 else ''} x "
             f"{run.local_batch}), lr {cfg.optim.lr:g}")
    # a resumed run replays everything after its checkpoint at global_step, whose own events are kept
    with (SummaryWriter(run.dir / "tb", purge_step=run.global_step + 1 if run.resumed else None) if world.main
          else NoWriter()) as writer:
        with Loop(run, writer) as loop:  # a stop signal ends it at a step's end, with last.pt saved (repro/loop.py)
            while not run.schedule.finished:
                loop.epoch()
            metrics_path = run.dir / "metrics.json"
            if metrics_path.is_file():  # finished before; nothing left to do
                return json.loads(metrics_path.read_text())
            metrics = loop.final_evaluation()
        for key in PAPER_METRICS:
            writer.add_scalar(f"val/{key}_final", metrics[key], run.global_step)
        metrics.update(
            epoch=run.epoch, step=run.global_step,
            val_complete=cfg.data.limit_val is None, train_images=len(run.train_split), dataset=run.dataset,
            store_records=run.records,
            images_per_s=loop.images / loop.seconds if loop.seconds else None,
            preset=run.model.preset, model_options=run.model.options,
            data_options={"batch_size": cfg.data.batch_size, **augment_options(run.record["data"])},
            schedule=run.record["schedule"]["kind"], devices=run.devices, history=run.history,
            effective_batch=cfg.data.batch_size, processes=world.size, batch_per_process=run.local_batch,
            base_lr=cfg.optim.lr, precision=speed.precision(cfg.speed), setting_changes=run.changes,
            threads=run.threads)
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in flatten({"model": run.model.options, "data": metrics["data_options"],
                                        "optim": run.record["optim"], "schedule": run.record["schedule"]}).items()}
        writer.add_hparams(hparams, {f"hparam/{k}": metrics[k] for k in PAPER_METRICS}, run_name=".")
    if not world.main:
        return metrics
    write_json(metrics_path, metrics)
    log.info(f"finished: {json.dumps({k: metrics[k] for k in PAPER_METRICS})}")
    return metrics
