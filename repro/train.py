"""Training (§5): `train(cfg)` runs one experiment into its run folder and returns the metrics; `main` is the
`repro-train` Hydra entry point around it.

The run folder is the record: `.hydra/` (config), `train.log`, `tb/` (TensorBoard), `checkpoints/last.pt` and
`best.pt`, `metrics.json`, `report.md`. Running the same command with the same `hydra.run.dir` resumes from
`last.pt`; with `deterministic=true` a resumed run ends with exactly the weights of an uninterrupted one, because
every random draw of a step (crop, flip, colour noise, dropout) is seeded by (seed, epoch, step). Under torchrun
every process runs `train`, each on its slice of the global batch, with DDP (repro/distributed.py); rank 0 alone
writes the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from repro import speed
from repro.config import build_model
from repro.data import Augment, PreparedStore, Split, StoreError, batches, step_rng
from repro.distributed import World
from repro.evaluate import evaluate, evaluate_views
from repro.figures import conv1_colour, conv1_grids
from repro.optim import PaperSGD, Schedule, load_state, param_groups
from repro.paper import PAPER_METRICS, comparison_table
from repro.prepare import atomic_write, write_json
from repro.runtime import CONF_DIR, RunError, environment, load_checkpoint, save_checkpoint, set_determinism

log = logging.getLogger("repro")

# Settings a resumed run must share with the checkpoint (anything else, e.g. the learning rate, may change).
FIXED_ON_RESUME = ("model", "data.store", "data.batch_size", "data.limit_train", "seed")


def subset(split: Split, limit: int | None, seed: int) -> Split:
    """A seeded random `limit` of the split's usable rows (all of them when `limit` is None)."""
    if limit is not None and limit < len(split):
        split.rows = np.sort(np.random.default_rng([seed, 7]).choice(split.rows, limit, replace=False))
    return split


def seed_dropout(value: int, devices: list[str]) -> None:
    """Seed this step's dropout masks. Each GPU has its own generator and `torch.manual_seed` gives them all the
    same seed, so towers on two GPUs would drop the same units; each GPU gets a seed of its own instead."""
    torch.manual_seed(value)
    for offset, device in enumerate(dict.fromkeys(devices)):
        if torch.device(device).type == "cuda":
            with torch.cuda.device(torch.device(device)):
                torch.cuda.manual_seed(value + offset)


def attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logging.getLogger().handlers + log.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    return handler


class NoWriter:
    """What ranks other than 0 get instead of a SummaryWriter: the same calls, and no files."""

    def __enter__(self) -> "NoWriter":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class FlatLossWatch:
    """Warns once when the loss sits at ln(classes), i.e. at chance, for `patience` steps in a row: the known slow
    start of the paper's initialisation (biases of 1, weights of std 0.01; paper-facts section 5)."""

    def __init__(self, classes: int, patience: int):
        self.classes, self.chance, self.patience = classes, math.log(classes), patience
        self.steps, self.warned = 0, False

    def update(self, mean_loss: float, steps: int) -> str | None:
        self.steps = self.steps + steps if abs(mean_loss - self.chance) < 0.02 else 0
        if self.steps < self.patience or self.warned:
            return None
        self.warned = True
        return (f"the loss has stayed at ln({self.classes}) = {self.chance:.3f} (chance) for {self.steps} steps. "
                "This is the known slow start of the paper's initialisation (biases of 1 with weights of std 0.01; "
                "Caffe issues #59 and #2085): it usually leaves this plateau within ~15k steps. If it does not, "
                "try model.init_bias=0.1 (Caffe's fix) or another seed")


class Run:
    """The state of one training run, and the steps that change it."""

    def __init__(self, cfg: DictConfig, world: World = World()):
        self.cfg, self.world = cfg, world
        self.record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.dir = Path(cfg.run_dir)
        self.checkpoints = self.dir / "checkpoints"
        if world.main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        for key in ("data.batch_size", "data.pca_std", "eval_batch_size", "checkpoint_every", "log_every"):
            value = OmegaConf.select(cfg, key)
            if value <= 0 and not (key == "data.pca_std" and value == 0):
                raise RunError(f"{key}={value}: must be positive")
        self.local_batch = world.local_batch(cfg.data.batch_size)
        self.devices = world.devices(cfg.devices, cfg.require_two_gpus)
        if world.launched and self.devices[0].startswith("cuda"):
            torch.cuda.set_device(self.devices[0])  # NCCL's own work goes to this rank's first GPU
        set_determinism(cfg.deterministic)
        speed.set_cudnn_benchmark(cfg.speed.cudnn_benchmark, cfg.deterministic)
        speed.set_precision(cfg.speed.tf32)
        store = PreparedStore(cfg.data.store)
        self.dataset = store.description
        self.train_split = subset(store.split("train"), cfg.data.limit_train, cfg.seed)
        self.val_split = subset(store.split("val"), cfg.data.limit_val, cfg.seed)
        self.steps_per_epoch = len(self.train_split) // cfg.data.batch_size
        if self.steps_per_epoch == 0:
            raise RunError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(self.train_split)} "
                           "training images; lower it")
        num_classes = cfg.model.num_classes or len(store.classes)
        if num_classes != len(store.classes):
            raise RunError(f"model.num_classes={num_classes} but the store {store.root} has {len(store.classes)}"
                           " classes; leave model.num_classes unset")
        self.record["model"]["num_classes"] = num_classes  # so the checkpoint rebuilds the same network
        stats, data = store.stats(), self.record["data"]
        torch.manual_seed(cfg.seed)  # the initial weights (§5), drawn on the CPU: the same on any devices
        try:
            self.model = build_model(self.record["model"], self.devices)
            self.augment = Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"],
                                   devices=self.model.devices, pca_lighting=data["pca_lighting"],
                                   pca_std=data["pca_std"], lighting_style=data["lighting_style"],
                                   mean_crop=data["mean_crop"], crop_chunk=data["crop_chunk"])
        except ValueError as error:  # an option out of range, named by the model or the augmentation
            raise RunError(str(error)) from None
        speed.apply(self.model, cfg.speed)
        self.scaler = speed.grad_scaler(cfg.speed, self.devices[0])
        self.optimizer = PaperSGD(param_groups(self.model, cfg.optim.weight_decay, cfg.optim.decay_biases),
                                  lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        self.schedule = Schedule(lr=cfg.optim.lr, bias_lr=cfg.optim.bias_lr, **self.record["schedule"])
        self.epoch = self.step = self.global_step = 0
        self.history: list[dict] = []
        self.resumed = (self.checkpoints / "last.pt").is_file()
        if self.resumed:
            self.load(self.checkpoints / "last.pt")
        starts = world.gather(self.global_step if self.resumed else None)
        if len(set(starts)) > 1:
            raise RunError(f"the processes would start from different points ({starts}, per rank: a step, or None "
                           f"for no checkpoint): {self.checkpoints} must be one folder that every node sees")
        self.last_saved_step = self.global_step if self.resumed else None
        self.flat_loss = FlatLossWatch(num_classes, cfg.flat_loss_steps)
        self.net = world.wrap(self.model)  # training steps go through DDP; evaluation and checkpoints use the model

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(),
                "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                "history": self.history, "config": self.record}

    def save(self, best: bool = False) -> None:
        if not self.world.main:  # every rank holds the same state; rank 0 writes it
            return
        state = self.state()
        save_checkpoint(self.checkpoints / "last.pt", state)
        if best:
            save_checkpoint(self.checkpoints / "best.pt", state)

    def load(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved, now = flatten(checkpoint["config"]), flatten(self.record)
        changed = [k for k in now if k.startswith(FIXED_ON_RESUME) and saved.get(k) != now[k]]
        if changed:
            raise RunError(f"{self.dir} holds a run with different settings ({', '.join(changed)}: "
                           f"{[saved.get(k) for k in changed]} there, {[now[k] for k in changed]} now); "
                           "resume with the same settings, or start a new run in another hydra.run.dir")
        self.model.load_state_dict(checkpoint["model"])
        load_state(self.optimizer, checkpoint["optimizer"], self.model)
        if checkpoint.get("scaler"):  # empty when the run was not in fp16 then
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.epoch, self.step, self.global_step = checkpoint["epoch"], checkpoint["step"], checkpoint["global_step"]
        self.history = checkpoint["history"]
        # No generator state is restored (checkpoints before this version carry one, ignored): every draw of a step
        # is seeded by (seed, epoch, step), so a resumed run needs none, on any number of GPUs.

    # -- one epoch ---------------------------------------------------------------------------------------------

    def train_epoch(self, writer: SummaryWriter, timing: dict) -> None:
        cfg = self.cfg
        self.schedule.apply(self.optimizer, self.epoch)
        self.augment.pca_lighting = cfg.data.pca_lighting and self.schedule.colour_noise(self.epoch)
        rates = self.schedule.rates(self.epoch)  # lr, and bias_lr when the biases have a rate of their own
        log.info(self.schedule.describe(self.epoch))
        self.net.train()
        shard = (self.world.rank, self.world.size)
        loader = batches(self.train_split, cfg.data.batch_size, seed=cfg.seed, epoch=self.epoch,
                         start_step=self.step, workers=cfg.data.workers,
                         pin_memory=self.devices[0].startswith("cuda"), shard=shard)
        loader = speed.prefetch(loader, self.model.devices) if cfg.speed.prefetch else loader
        bar = tqdm(total=self.steps_per_epoch, initial=self.step, desc=f"epoch {self.epoch}", unit="step",
                   dynamic_ncols=True, disable=None if self.world.main else True)
        window_loss = torch.zeros((), device=self.devices[0])
        window_wrong = torch.zeros((), device=self.devices[0])
        window_steps, window_images, window_start, data_wait = 0, 0, time.perf_counter(), 0.0
        waited = time.perf_counter()
        for images, labels in loader:
            data_wait += time.perf_counter() - waited
            # each rank draws its own dropout masks (one seed would give every rank's i-th image the same masks)
            dropout_seed = int(step_rng(cfg.seed, self.epoch, self.step, stream=2).integers(2**62))
            seed_dropout(dropout_seed + 2 * self.world.rank, self.devices)
            x = self.augment.train(images, step_rng(cfg.seed, self.epoch, self.step), shard)
            labels = labels.to(self.devices[0], non_blocking=True)
            logits = self.net(x)
            loss = F.cross_entropy(logits, labels)  # §5: mean over the batch
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # fp16 autocast: a scaled loss; otherwise the loss itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
            window_loss += loss.detach()
            window_wrong += (logits.detach().argmax(dim=1) != labels).sum()
            window_steps, window_images = window_steps + 1, window_images + len(labels) * self.world.size
            self.step, self.global_step = self.step + 1, self.global_step + 1
            bar.update(1)
            checkpoint_due = self.global_step % cfg.checkpoint_every == 0
            if window_steps == cfg.log_every or checkpoint_due or self.step == self.steps_per_epoch:
                self.world.sum(window_loss)  # the global batch's loss and errors, the same on every rank
                self.world.sum(window_wrong)
                mean_loss = window_loss.item() / window_steps / self.world.size  # the only host sync: once a window
                if not math.isfinite(mean_loss):
                    last_good = (f"the last good checkpoint is {self.checkpoints / 'last.pt'} (step "
                                 f"{self.last_saved_step}); lower optim.lr and run the same command to resume from it"
                                 if self.last_saved_step is not None else "no checkpoint had been written yet; "
                                 "lower optim.lr and start again")
                    raise RunError(f"the loss became {mean_loss} between steps {self.global_step - window_steps} "
                                   f"and {self.global_step} (epoch {self.epoch}); training stopped: {last_good}")
                seconds = time.perf_counter() - window_start
                timing["images"] += window_images
                timing["seconds"] += seconds
                rate = window_images / seconds
                warning = self.flat_loss.update(mean_loss, window_steps)
                if warning:
                    log.warning(warning)
                train_err = 100.0 * window_wrong.item() / window_images
                writer.add_scalar("train/loss", mean_loss, self.global_step)
                writer.add_scalar("train/top1_err", train_err, self.global_step)
                for tag, value in rates.items():
                    writer.add_scalar(tag, value, self.global_step)
                writer.add_scalar("perf/images_per_s", rate, self.global_step)
                writer.add_scalar("perf/data_wait_fraction", data_wait / seconds, self.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", **{k: f"{v:.0e}" for k, v in rates.items()},
                                img_s=f"{rate:.1f}", wait=f"{100 * data_wait / seconds:.0f}%")
                if bar.disable:
                    eta = (self.steps_per_epoch - self.step) * seconds / window_steps
                    log.info(f"epoch {self.epoch} step {self.step}/{self.steps_per_epoch} loss {mean_loss:.4f} "
                             f"train_err {train_err:.1f}% {' '.join(f'{k} {v:.0e}' for k, v in rates.items())} "
                             f"{rate:.1f} img/s data wait "
                             f"{100 * data_wait / seconds:.0f}% epoch eta {eta / 60:.1f} min")
                window_loss.zero_()
                window_wrong.zero_()
                window_steps, window_images, window_start, data_wait = 0, 0, time.perf_counter(), 0.0
                if checkpoint_due:
                    self.save()
                    self.last_saved_step = self.global_step
            waited = time.perf_counter()
        bar.close()

    def end_epoch(self, writer: SummaryWriter) -> None:
        cfg = self.cfg
        centre = evaluate(self.model, self.augment, self.val_split, cfg.eval_batch_size, False, cfg.data.workers,
                          world=self.world)
        entry = {"epoch": self.epoch, **self.schedule.rates(self.epoch), "top1_err_1crop": centre["top1_err"],
                 "top5_err_1crop": centre["top5_err"]}
        if cfg.ten_crop_every and (self.epoch + 1) % cfg.ten_crop_every == 0:
            ten = evaluate(self.model, self.augment, self.val_split, cfg.eval_batch_size, True, cfg.data.workers,
                           world=self.world)
            entry.update(top1_err_10crop=ten["top1_err"], top5_err_10crop=ten["top5_err"])
        for key, value in entry.items():
            if key.startswith("top"):
                writer.add_scalar(f"val/{key}", value, self.global_step)
        for t, (grid, colour) in enumerate(zip(conv1_grids(self.model), conv1_colour(self.model))):
            writer.add_image(f"filters/conv1_tower{t}", grid, self.global_step)  # the paper's Figure 3
            writer.add_scalar(f"filters/conv1_colour_specificity_tower{t}", colour, self.global_step)
        improved = centre["top1_err"] < self.schedule.best_error  # the schedule keeps the best error so far
        self.schedule.end_of_epoch(self.epoch, centre["top1_err"])
        self.history.append(entry)
        log.info(f"epoch {self.epoch} done: val top-1 {centre['top1_err']:.2f}% top-5 {centre['top5_err']:.2f}% "
                 f"(centre crop, {centre['images']} images){' (best so far)' if improved else ''}")
        self.epoch, self.step = self.epoch + 1, 0
        self.save(best=improved)
        self.last_saved_step = self.global_step


def train(cfg: DictConfig) -> dict:
    """Train (or resume) the run `cfg` describes, in `cfg.run_dir`; return its final metrics (also written to
    metrics.json). Raises RunError or StoreError with an explanation when something must be fixed first.
    Under torchrun every process calls it; they share rank 0's run folder, and only rank 0 writes to it."""
    world = World.from_env()
    world.start(cfg.dist_backend)
    cfg.run_dir = world.share(cfg.run_dir)  # rank 0's: Hydra's ${now} folder name can differ between processes
    if not cfg.run_dir:
        raise RunError("run_dir is not set (the repro-train entry point sets it to Hydra's output folder)")
    run_dir = Path(cfg.run_dir)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.json").unlink(missing_ok=True)  # from an earlier attempt that this one replaces
        handler = attach_log_file(run_dir / "train.log")
    else:
        handler = logging.NullHandler()
        log.setLevel(logging.ERROR)  # rank 0 logs for everyone
    try:
        return _train(cfg, world)
    except Exception as error:
        message = str(error) if isinstance(error, (RunError, StoreError)) else f"{type(error).__name__}: {error}"
        handler.handle(logging.makeLogRecord({"msg": f"stopped: {message}", "levelno": logging.ERROR,
                                              "levelname": "ERROR", "name": log.name}))
        if world.main:
            write_json(run_dir / "failed.json", {"error": message})  # what a sweep's summary reports for this job
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        world.stop()


def _train(cfg: DictConfig, world: World) -> dict:
    run = Run(cfg, world)
    log.info(("resuming " if run.resumed else "starting ") + f"{run.dir} at epoch {run.epoch} step {run.step}")
    log.info("environment: " + json.dumps(environment(run.devices)))
    log.info("precision: " + json.dumps(speed.precision(cfg.speed)))
    log.info("config:\n" + OmegaConf.to_yaml(cfg))
    log.info(f"{len(run.train_split)} training and {len(run.val_split)} validation images, "
             f"{run.steps_per_epoch} steps per epoch, devices {run.devices}")
    log.info(f"effective batch {cfg.data.batch_size} ({world.size} process{'es' if world.size > 1 else ''} x "
             f"{run.local_batch}), lr {cfg.optim.lr:g}")
    timing = {"images": 0, "seconds": 0.0}
    # a resumed run replays everything after its checkpoint at global_step, whose own events are kept
    with (SummaryWriter(run.dir / "tb", purge_step=run.global_step + 1 if run.resumed else None) if world.main
          else NoWriter()) as writer:
        while not run.schedule.finished:
            run.train_epoch(writer, timing)
            run.end_epoch(writer)
        metrics_path = run.dir / "metrics.json"
        if metrics_path.is_file():  # finished before; nothing left to do
            return json.loads(metrics_path.read_text())
        metrics = evaluate_views(run.model, run.augment, run.val_split, cfg.eval_batch_size, cfg.data.workers,
                                 desc="final eval" if world.main else None, world=world)
        for key in PAPER_METRICS:
            writer.add_scalar(f"val/{key}_final", metrics[key], run.global_step)
        metrics.update(
            epoch=run.epoch, step=run.global_step,
            val_complete=cfg.data.limit_val is None, train_images=len(run.train_split), dataset=run.dataset,
            images_per_s=timing["images"] / timing["seconds"] if timing["seconds"] else None,
            preset=run.model.preset, model_options=run.model.options,
            data_options={k: run.record["data"][k] for k in ("batch_size", "pca_lighting", "pca_std",
                                                               "lighting_style", "mean_crop", "crop_chunk")},
            schedule=run.record["schedule"]["kind"], devices=run.devices, history=run.history,
            effective_batch=cfg.data.batch_size, processes=world.size, batch_per_process=run.local_batch,
            base_lr=cfg.optim.lr, precision=speed.precision(cfg.speed))
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in flatten({"model": run.model.options, "data": metrics["data_options"],
                                        "optim": run.record["optim"], "schedule": run.record["schedule"]}).items()}
        writer.add_hparams(hparams, {f"hparam/{k}": metrics[k] for k in PAPER_METRICS}, run_name=".")
    if not world.main:
        return metrics
    write_json(metrics_path, metrics)
    write_report(run.dir)
    log.info(f"finished: {json.dumps({k: metrics[k] for k in PAPER_METRICS})}")
    return metrics


def write_report(run_dir: Path) -> str:
    """report.md in the run folder: this run's errors beside the paper's and other published ones."""
    metrics_path = Path(run_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path} does not exist: the run has not finished (resume it to finish it)")
    metrics = json.loads(metrics_path.read_text())
    table = comparison_table(metrics, metrics["dataset"])
    text = (f"# {Path(run_dir).name}: {metrics['preset']} preset, epoch {metrics['epoch']}, step {metrics['step']}\n\n"
            f"{table}\n")
    atomic_write(Path(run_dir) / "report.md", lambda f: f.write(text.encode()))
    return text


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    world = World.from_env()
    if not world.main:
        # Only rank 0's Hydra makes the run folder (its ${now} name may differ here); train() shares it.
        sys.argv = [a for a in sys.argv if not a.lstrip("+~").startswith("hydra.run.dir=")] + [
            "hydra.run.dir=.", "hydra.output_subdir=null"]

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
    def run(cfg: DictConfig) -> float:
        if cfg.run_dir is None:
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        try:
            metrics = train(cfg)
        except (RunError, StoreError) as error:
            print(f"repro-train: error{f' (rank {world.rank})' if world.launched else ''}: {error}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # Hydra marks the job failed and goes on with the sweep's other jobs (an exit would stop them)
            sys.exit(1)
        if world.main:
            print(write_report(cfg.run_dir))
        return metrics["top1_err_10crop"]

    run()


def resume_main(argv: list[str] | None = None) -> int:
    """`repro-resume RUN_DIR [OVERRIDE ...]`: continue a run from its last checkpoint, composing the config from the
    run's own command-line overrides (.hydra/overrides.yaml) plus any new ones (e.g. data.workers=8)."""
    import yaml
    from hydra import compose, initialize_config_dir

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: repro-resume RUN_DIR [OVERRIDE ...]", file=sys.stderr)
        return 2
    run_dir, extra = Path(argv[0]), argv[1:]
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        print(f"repro-resume: error: {overrides_file} does not exist: {run_dir} is not a repro-train run folder",
              file=sys.stderr)
        return 1
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *extra, f"run_dir={run_dir.resolve()}"])
    try:
        train(cfg)
    except (RunError, StoreError) as error:
        print(f"repro-resume: error: {error}", file=sys.stderr)
        return 1
    print(write_report(run_dir))
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """`repro-report RUN_DIR`: write and print a finished run's comparison with the paper."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: repro-report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(Path(argv[0])))
    except RunError as error:
        print(f"repro-report: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
