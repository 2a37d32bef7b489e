"""The epochs of a run (§5): the training steps, logged and checkpointed as they go, then the end-of-epoch
evaluation that drives the schedule.

Every random draw of a step (crop, flip, colour noise, dropout) is seeded by (seed, epoch, step), so a resumed run
takes exactly the steps an uninterrupted one would have. The host reads the device once per log window.

A signal of `cfg.stop_signals` (Ctrl-C, SLURM's SIGTERM on preemption, submitit's SIGUSR2 before a time limit) stops
the epochs cleanly: the current step (or the epoch's evaluation) finishes, `last.pt` is written, and `Stopped`
leaves the loop; the entry point then hands the signal to the launcher's own handler (docs/ablations.md). During the
final evaluation, when training is complete and saved, a signal stops at once: only the evaluation is lost.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time

import torch
import torch.nn.functional as F

from repro import speed
from repro.data import batches, step_rng
from repro.errors import RunError
from repro.evaluate import evaluate, evaluate_views
from repro.kernels import conv1_colour, conv1_grids
from repro.progress import PROGRESS, Progress, duration
from repro.run import Run

log = logging.getLogger("repro")


def seed_dropout(value: int, devices: list[str]) -> None:
    """Seed this step's dropout masks. Each GPU has its own generator and `torch.manual_seed` gives them all the
    same seed, so towers on two GPUs would drop the same units; each GPU gets a seed of its own instead."""
    torch.manual_seed(value)
    for offset, device in enumerate(dict.fromkeys(devices)):
        if torch.device(device).type == "cuda":
            with torch.cuda.device(torch.device(device)):
                torch.cuda.manual_seed(value + offset)


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


class Window:
    """The steps since the last log line: their loss and errors summed on the device, read once at the end.

    The first window of an epoch (`warm_up`) leaves its first step out of its rate, data wait and time left: that
    step waits for the loader's workers to start and, in a run's first, for cuDNN's autotuning, which no later step
    does. A window of that one step alone is timed whole, and says so."""

    def __init__(self, device: str, warm_up: bool = False):
        self.loss, self.wrong = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps, self.images, self.data_wait, self.start = 0, 0, 0.0, time.perf_counter()
        self.warm_up = warm_up
        self.first = None  # the warm-up step's (images, data wait, the time the window opened)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, images: int) -> None:
        self.loss += loss.detach()
        self.wrong += (logits.detach().argmax(dim=1) != labels).sum()
        self.steps, self.images = self.steps + 1, self.images + images
        if self.warm_up and self.steps == 1:  # the clock starts again after the first step
            self.first = (images, self.data_wait, self.start)
            self.start, self.data_wait = time.perf_counter(), 0.0

    def close(self, world) -> dict:
        """The window's global mean loss and error, and the rate, data wait and number of its timed steps (the same
        on every rank); `warm_up` says whether the epoch's first step was "left out" or, alone, "included"."""
        world.sum(self.loss)
        world.sum(self.wrong)
        steps, images, start, data_wait, warm_up = self.steps, self.images, self.start, self.data_wait, None
        if self.first is not None:
            first_images, first_wait, opened = self.first
            if self.steps > 1:
                steps, images, warm_up = steps - 1, images - first_images, "left out"
            else:
                start, data_wait, warm_up = opened, first_wait, "included"
        seconds = time.perf_counter() - start
        return {"loss": self.loss.item() / self.steps / world.size, "top1_err": 100.0 * self.wrong.item() / self.images,
                "steps": self.steps, "timed_steps": steps, "timed_images": images, "seconds": seconds,
                "images_per_s": images / seconds, "data_wait": data_wait / seconds, "warm_up": warm_up}


class Stopped(BaseException):
    """Training stopped on a signal, with `last.pt` holding where: not an error (the same command resumes), so, like
    KeyboardInterrupt, not an Exception, and nothing marks the run failed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    def hand_over(self) -> int:
        """Give the signal to the handler that was there before training, now restored: a launcher's, e.g.
        submitit's on SIGUSR2, which requeues the job and exits (submitit/core/job_environment.py,
        SignalHandler.checkpoint_and_try_requeue). Python's own SIGINT handler is left out: it would only raise
        KeyboardInterrupt. Returns the status to exit with when the handler returns (or there is none): the
        shell's for a process ended by the signal, 130 for Ctrl-C, 143 for SIGTERM."""
        handler = signal.getsignal(self.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)
        return 128 + self.signum


class StopSignals:
    """While installed (`install`, or as a context manager), each of `names` (signal names, e.g. SIGTERM) only
    records that it came; `requested` says when to stop. The handlers that were there before are put back by
    `restore`. While `at_once` holds words (a phase that has nothing to save: the words say what is kept), the first
    signal stops at once instead: it logs "stopped by SIGNAL <at_once>" and raises Stopped where the process is."""

    def __init__(self, names, at_once: str | None = None):
        self.signals = []
        for name in names:
            if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
                raise RunError(f"stop_signals: {name!r} is not a signal a process can catch (e.g. SIGTERM, SIGINT, "
                               "SIGUSR1); [] turns the clean stop off")
            self.signals.append(signal.Signals[name])
        self.received: int | None = None
        self.previous: dict = {}
        self.at_once = at_once

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self.previous = {s: signal.signal(s, self.catch) for s in self.signals}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def catch(self, signum: int, frame) -> None:
        self.received = signum
        if self.at_once is not None:
            message, self.at_once = f"stopped by {signal.Signals(signum).name} {self.at_once}", None  # once
            log.info(message)
            raise Stopped(signum, message)

    def requested(self, world, at_window_end: bool) -> int | None:
        """The signal to stop on, if any. One process stops after any step; under torchrun the processes agree at
        the end of a log window (where they already exchange the loss), so that every rank stops at the same step
        and none waits in a collective for the others."""
        if not world.launched:
            return self.received
        if not at_window_end:
            return None
        return next((s for s in world.gather(self.received) if s is not None), None)


class Loop:
    """Runs the epochs of `run`, writing TensorBoard through `writer` (a no-op one on ranks other than 0). Used as a
    context manager, it catches `cfg.stop_signals` for its duration."""

    def __init__(self, run: Run, writer):
        self.run, self.writer = run, writer
        self.flat_loss = FlatLossWatch(run.num_classes, run.cfg.flat_loss_steps)
        self.images, self.seconds = 0, 0.0  # trained here, for the run's images/s
        self.stop = StopSignals(run.cfg.stop_signals)

    def __enter__(self) -> "Loop":
        self.stop.install()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()

    def epoch(self) -> None:
        self.train_epoch()
        self.end_epoch()  # a signal during the epoch's evaluation waits for its checkpoint: nothing is lost
        self.stop_if_requested(self.stop.requested(self.run.world, at_window_end=True))

    def stop_if_requested(self, signum: int | None) -> None:
        """Raise Stopped when a stop signal came; `last.pt` is up to date by then."""
        if signum is None:
            return
        run = self.run
        message = (f"stopped by {signal.Signals(signum).name} at epoch {run.epoch} step {run.step} (global step "
                   f"{run.global_step}); {run.checkpoints / 'last.pt'} holds it and the same command resumes there")
        log.info(message)
        raise Stopped(signum, message)

    def final_evaluation(self) -> dict:
        """The run's closing evaluation of the trained network (centre crop and 10 patches). A stop signal during it
        stops at once: training is complete and saved, so nothing but the evaluation is lost, and the same command
        (finding `last.pt` finished) runs it again."""
        run = self.run
        self.stop_if_requested(self.stop.requested(run.world, at_window_end=True))  # one that came since the epoch
        self.stop.at_once = (f"during the final evaluation; nothing is lost: training is complete in "
                             f"{run.checkpoints / 'last.pt'} (global step {run.global_step}) and the same command "
                             "runs the evaluation again")
        try:
            return evaluate_views(run.model, run.augment, run.val_split, run.cfg.eval_batch_size, run.workers,
                                  desc="final evaluation" if run.world.main else None, world=run.world,
                                  decode_on=run.decode_on)
        finally:
            self.stop.at_once = None

    def train_epoch(self) -> None:
        run, cfg = self.run, self.run.cfg
        run.schedule.apply(run.optimizer, run.epoch)
        run.augment.pca_lighting = cfg.data.pca_lighting and run.schedule.colour_noise(run.epoch)
        log.info(run.schedule.describe(run.epoch))
        run.net.train()
        shard = (run.world.rank, run.world.size)
        loader = batches(run.train_split, cfg.data.batch_size, seed=cfg.seed, epoch=run.epoch, start_step=run.step,
                         workers=run.workers, pin_memory=run.devices[0].startswith("cuda"), shard=shard,
                         decode_on=run.decode_on)
        loader = speed.prefetch(loader, run.model.devices) if cfg.speed.prefetch else loader
        window = Window(run.devices[0], warm_up=True)
        with Progress(f"epoch {run.epoch}", run.steps_per_epoch, "step", initial=run.step, every=math.inf,
                      show=run.world.main) as bar:  # the window's lines say where the epoch is
            waited = time.perf_counter()
            for images, labels in loader:
                window.data_wait += time.perf_counter() - waited
                # each rank draws its own dropout masks (one seed would give every rank's i-th image the same masks)
                dropout_seed = int(step_rng(cfg.seed, run.epoch, run.step, stream=2).integers(2**62))
                seed_dropout(dropout_seed + 2 * run.world.rank, run.devices)
                x = run.augment.train(images, step_rng(cfg.seed, run.epoch, run.step), shard)
                labels = labels.to(run.devices[0], non_blocking=True)
                logits = run.net(x)
                loss = F.cross_entropy(logits, labels)  # §5: mean over the batch
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()  # fp16 autocast: a scaled loss; otherwise the loss itself
                run.scaler.step(run.optimizer)
                run.scaler.update()
                window.add(loss, logits, labels, len(labels) * run.world.size)
                run.step, run.global_step = run.step + 1, run.global_step + 1
                bar.update(1)
                checkpoint_due = run.global_step % cfg.checkpoint_every == 0
                window_end = window.steps == cfg.log_every or checkpoint_due or run.step == run.steps_per_epoch
                stop = self.stop.requested(run.world, window_end)
                if window_end or stop is not None:
                    self.report(window.close(run.world), bar)
                    window = Window(run.devices[0])
                    if checkpoint_due or stop is not None:
                        run.save()
                self.stop_if_requested(stop)
                waited = time.perf_counter()

    def report(self, stats: dict, bar: Progress) -> None:
        """A closed window: stop on a non-finite loss, else count it, warn of a flat loss, log it everywhere."""
        run = self.run
        if not math.isfinite(stats["loss"]):
            last_good = (f"the last good checkpoint is {run.checkpoints / 'last.pt'} (step {run.last_saved_step}); "
                         "lower optim.lr and run the same command to resume from it"
                         if run.last_saved_step is not None else "no checkpoint had been written yet; lower optim.lr "
                         "and start again")
            raise RunError(f"the loss became {stats['loss']} between steps {run.global_step - stats['steps']} and "
                           f"{run.global_step} (epoch {run.epoch}); training stopped: {last_good}")
        self.images, self.seconds = self.images + stats["timed_images"], self.seconds + stats["seconds"]
        warning = self.flat_loss.update(stats["loss"], stats["steps"])
        if warning:
            log.warning(warning)
        rates = run.schedule.rates(run.epoch)  # lr, and bias_lr when the biases have a rate of their own
        for tag, value in {"train/loss": stats["loss"], "train/top1_err": stats["top1_err"], **rates,
                           "perf/images_per_s": stats["images_per_s"],
                           "perf/data_wait_fraction": stats["data_wait"]}.items():
            self.writer.add_scalar(tag, value, run.global_step)
        bar.bar.set_postfix(loss=f"{stats['loss']:.4f}", **{k: f"{v:.0e}" for k, v in rates.items()},
                            img_s=f"{stats['images_per_s']:.1f}", wait=f"{100 * stats['data_wait']:.0f}%")
        left = (run.steps_per_epoch - run.step) * stats["seconds"] / stats["timed_steps"]
        warm_up = {"left out": " (the epoch's first step, the loader's start-up, left out of the rate)",
                   "included": " (this one step includes the loader's start-up)", None: ""}[stats["warm_up"]]
        log.info(f"epoch {run.epoch} step {run.step}/{run.steps_per_epoch} loss {stats['loss']:.4f} train_err "
                 f"{stats['top1_err']:.1f}% {' '.join(f'{k} {v:.0e}' for k, v in rates.items())} "
                 f"{stats['images_per_s']:.1f} img/s data wait {100 * stats['data_wait']:.0f}% epoch "
                 f"{duration(left)} left{warm_up}", extra=PROGRESS)

    def end_epoch(self) -> None:
        run, cfg = self.run, self.run.cfg
        desc = f"epoch {run.epoch} validation" if run.world.main else None
        centre = evaluate(run.model, run.augment, run.val_split, cfg.eval_batch_size, False, run.workers,
                          desc=desc, world=run.world, decode_on=run.decode_on)
        entry = {"epoch": run.epoch, **run.schedule.rates(run.epoch), "top1_err_1crop": centre["top1_err"],
                 "top5_err_1crop": centre["top5_err"]}
        if cfg.ten_crop_every and (run.epoch + 1) % cfg.ten_crop_every == 0:
            ten = evaluate(run.model, run.augment, run.val_split, cfg.eval_batch_size, True, run.workers,
                           desc=desc and f"{desc}, 10 patches", world=run.world, decode_on=run.decode_on)
            entry.update(top1_err_10crop=ten["top1_err"], top5_err_10crop=ten["top5_err"])
        for key, value in entry.items():
            if key.startswith("top"):
                self.writer.add_scalar(f"val/{key}", value, run.global_step)
        for t, (grid, colour) in enumerate(zip(conv1_grids(run.model), conv1_colour(run.model))):
            self.writer.add_image(f"filters/conv1_tower{t}", grid, run.global_step)  # the paper's Figure 3
            self.writer.add_scalar(f"filters/conv1_colour_specificity_tower{t}", colour, run.global_step)
        improved = centre["top1_err"] < run.schedule.best_error  # the schedule keeps the best error so far
        run.schedule.end_of_epoch(run.epoch, centre["top1_err"])
        run.history.append(entry)
        log.info(f"epoch {run.epoch} done: val top-1 {centre['top1_err']:.2f}% top-5 {centre['top5_err']:.2f}% "
                 f"(centre crop, {centre['images']} images){' (best so far)' if improved else ''}")
        run.epoch, run.step = run.epoch + 1, 0
        run.save(best=improved)
