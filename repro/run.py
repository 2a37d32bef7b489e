"""One training run's state, assembled from its config: the store's splits, the network on its devices (§3), the
input pipeline (§4.1), the optimiser and schedule (§5) and the position (epoch, step), saved to and resumed from
the run folder's checkpoints. `repro.loop` runs its epochs, `repro.train` the whole run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from repro import speed
from repro.checkpoint import check_classes, load_checkpoint, previous, save_checkpoint
from repro.config import AUGMENT_OPTIONS, TrainConfig, build_augment, build_model, validate
from repro.data import decode_device
from repro.distributed import World
from repro.errors import DiskFullError, RunError
from repro.io import flatten
from repro.optim import PaperSGD, Schedule, load_state, param_groups
from repro.runtime import set_determinism, use_devices, worker_count
from repro.store import PreparedStore

log = logging.getLogger("repro")
# Settings that define what a run measures: a resume that gives other values than its checkpoint's is refused. They
# are the network (every model option, so three of the paper's ablations), the images and how they are seen (the
# store, the batch, both subsets, every augmentation option: the colour-noise ablation, and where JPEG records are
# decoded: libjpeg and nvJPEG may round a pixel differently), the update rule (momentum,
# weight decay, which biases decay), the kind of schedule, the seed, the arithmetic (autocast, tf32) and
# `deterministic`. Every other setting may change on resume (the rates and the schedule's numbers, as the paper
# changed its rates by hand; workers, devices, the speed options that only reorder float32 sums, logging and
# checkpointing): the change is logged at its step and kept in the run's record (`changes`, docs/training.md).
FIXED_ON_RESUME = ("model", "data.store", "data.batch_size", "data.limit_train", "data.limit_val",
                   *(f"data.{option}" for option in AUGMENT_OPTIONS), "data.decode", "optim.momentum",
                   "optim.weight_decay", "optim.decay_biases", "schedule.kind", "seed", "deterministic",
                   "speed.autocast", "speed.tf32")
NOT_SETTINGS = ("run_dir",)  # where the run is, not how it runs


def fixed_on_resume(key: str) -> bool:
    """Whether the flattened setting `key` (e.g. "model.lrn") must keep its value when a run resumes."""
    return any(key == fixed or key.startswith(f"{fixed}.") for fixed in FIXED_ON_RESUME)


def changed_settings(saved: dict, now: dict) -> list[str]:
    """The flattened settings of the record `now` whose values differ from the checkpoint's record `saved`."""
    saved, now = with_later_settings(flatten(saved)), flatten(now)
    return [key for key in now if key not in NOT_SETTINGS and saved.get(key) != now[key]]


def with_later_settings(saved: dict) -> dict:
    """A checkpoint's flattened record with the settings added to the code since it was written, at their defaults:
    a new setting's default is what the code did before it existed (e.g. `data.decode=loader`)."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True))
    return {**{key: value for key, value in defaults.items() if value != "???"}, **saved}


def saved_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint a run resumes from in its folder `checkpoints`: last.pt, or last.prev.pt alone after a stop
    between the two renames of a save; None for a new run."""
    latest = checkpoints / "last.pt"
    return next((path for path in (latest, previous(latest)) if path.is_file()), None)


class Run:
    """The state of one training run: what its steps change, and what its checkpoints hold."""

    def __init__(self, cfg: DictConfig, world: World = World()):
        validate(cfg)
        store = PreparedStore(cfg.data.store, verify=cfg.data.verify)  # checked before anything is made
        self.cfg, self.world = cfg, world
        self.record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.dir = Path(cfg.run_dir)
        self.checkpoints = self.dir / "checkpoints"
        if world.main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.local_batch = world.local_batch(cfg.data.batch_size)
        self.devices = world.devices(cfg.devices, cfg.require_two_gpus)
        use_devices(self.devices)  # before any loader pins memory
        set_determinism(cfg.deterministic)
        self.threads = torch.get_num_threads()  # CPU results depend on it (docs/reliability.md); a resume may pin it
        self.workers = worker_count(cfg.data.workers, world.local_size)
        speed.set_cudnn_benchmark(cfg.speed.cudnn_benchmark, cfg.deterministic)
        speed.set_precision(cfg.speed.tf32)
        self.dataset, self.classes, self.records = store.description, store.classes, store.records_spec
        self.train_split = store.split("train").sample(cfg.data.limit_train, cfg.seed)
        self.val_split = store.split("val").sample(cfg.data.limit_val, cfg.seed)
        self.steps_per_epoch = len(self.train_split) // cfg.data.batch_size
        if self.steps_per_epoch == 0:
            raise RunError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(self.train_split)} "
                           "training images; lower it")
        self.num_classes = cfg.model.num_classes or len(store.classes)
        if self.num_classes != len(store.classes):
            raise RunError(f"model.num_classes={self.num_classes} but the store {store.root} has "
                           f"{len(store.classes)} classes; leave model.num_classes unset")
        self.record["model"]["num_classes"] = self.num_classes  # so the checkpoint rebuilds the same network
        self.decode_on = decode_device(cfg.data.decode.name, store, self.devices[0])
        torch.manual_seed(cfg.seed)  # the initial weights (§5), drawn on the CPU: the same on any devices
        try:
            self.model = build_model(self.record["model"], self.devices)
            self.augment = build_augment(self.record["data"], store.stats(), self.model.devices)
        except ValueError as error:  # an option out of range, named by the model or the augmentation
            raise RunError(str(error)) from None
        speed.apply(self.model, cfg.speed)
        self.scaler = speed.grad_scaler(cfg.speed, self.devices[0])
        self.optimizer = PaperSGD(param_groups(self.model, cfg.optim.weight_decay, cfg.optim.decay_biases),
                                  lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        self.schedule = Schedule(lr=cfg.optim.lr, bias_lr=cfg.optim.bias_lr, **self.record["schedule"])
        self.epoch = self.step = self.global_step = 0
        self.history: list[dict] = []
        self.changes: list[dict] = []  # the settings a resume changed, and from which step (`load`)
        latest = saved_checkpoint(self.checkpoints)
        if latest is not None and latest.name != "last.pt":
            log.warning(f"{self.checkpoints / 'last.pt'} is missing but {latest} is there (a stop between the two "
                        "renames of a save): resuming from it")
        self.resumed = latest is not None
        if self.resumed:
            self.load(latest)
        starts = world.gather(self.global_step if self.resumed else None)
        if len(set(starts)) > 1:
            raise RunError(f"the processes would start from different points ({starts}, per rank: a step, or None "
                           f"for no checkpoint): {self.checkpoints} must be one folder that every node sees")
        self.last_saved_step = self.global_step if self.resumed else None
        self.net = world.wrap(self.model)  # training steps go through DDP; evaluation and checkpoints use the model

    def state(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(),
                "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                "history": self.history, "changes": self.changes, "threads": self.threads, "config": self.record,
                "classes": self.classes}

    def save(self, best: bool = False) -> None:
        """last.pt (keeping the one it replaces as last.prev.pt), and best.pt when `best`."""
        intact = self.last_saved_step
        self.last_saved_step = self.global_step
        if not self.world.main:  # every rank holds the same state; rank 0 writes it
            return
        state, last = self.state(), self.checkpoints / "last.pt"
        try:
            save_checkpoint(last, state, keep_previous=True)
            intact = self.global_step
            if best:
                save_checkpoint(self.checkpoints / "best.pt", state)
        except DiskFullError as error:
            then = (f"{last} (step {intact}) is intact: free some space and run the same command to resume from it"
                    if intact is not None else "no checkpoint had been written yet: free some space and start again")
            raise RunError(f"{error}; {then}") from None

    def load(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved, now = with_later_settings(flatten(checkpoint["config"])), flatten(self.record)
        changed = changed_settings(saved, now)
        fixed = [k for k in changed if fixed_on_resume(k)]
        if fixed:
            raise RunError(f"{self.dir} holds a run with different settings ({', '.join(fixed)}: "
                           f"{[saved.get(k) for k in fixed]} there, {[now[k] for k in fixed]} now), which define "
                           "what it measures; resume with the same settings, or start a new run in another "
                           "hydra.run.dir")
        check_classes(checkpoint, path, self.classes, self.cfg.data.store)
        self.model.load_state_dict(checkpoint["model"])
        load_state(self.optimizer, checkpoint["optimizer"], self.model)
        if checkpoint.get("scaler"):  # empty when the run was not in fp16 then
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.epoch, self.step, self.global_step = checkpoint["epoch"], checkpoint["step"], checkpoint["global_step"]
        self.history = checkpoint["history"]
        self.changes = checkpoint.get("changes", [])
        if changed:
            self.changes.append({"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                                 "settings": {k: [saved.get(k), now[k]] for k in changed}})
            log.info(f"settings changed from epoch {self.epoch} step {self.step} (global step {self.global_step}) on: "
                     + ", ".join(f"{k} {json.dumps(saved.get(k))} -> {json.dumps(now[k])}" for k in changed))
        threads = checkpoint.get("threads")
        if self.cfg.deterministic and threads and threads != self.threads:
            log.info(f"deterministic=true: {threads} CPU threads, as the run had so far (this process would have "
                     f"{self.threads}; CPU results depend on the count)")
            torch.set_num_threads(threads)
            self.threads = threads
        # No generator state is restored (checkpoints before this version carry one, ignored): every draw of a step
        # is seeded by (seed, epoch, step), so a resumed run needs none, on any number of GPUs.
