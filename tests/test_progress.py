"""One progress convention: a bar on a terminal, lines with the rate and the time left in the log; the console
drops the lines while a bar shows them, files keep them."""

import functools
import logging
import re

import pytest
import torch

import repro.evaluate
from helpers import tiny_cfg
from repro import loop as loop_module
from repro import progress as progress_module
from repro.distributed import World
from repro.loop import Window
from repro.progress import ConsoleFilter, Progress
from repro.train import train


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_phase_logs_its_rate_and_time_left_as_progress_lines():
    handler, log = Records(), logging.getLogger("repro")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for _ in Progress("counting", 4, "img", every=0).iterate(range(4)):
            pass
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [r.getMessage() for r in handler.records]
    assert len(lines) == 3  # after each item but the last: the phase's end is said by whoever comes next
    assert re.fullmatch(r"counting: 1/4 img \(25%\), [\d.,]+ img/s, \d+ s left", lines[0])
    assert all(getattr(r, "progress", False) for r in handler.records)


def test_the_console_drops_progress_lines_only_on_a_terminal(monkeypatch):
    line = logging.makeLogRecord({"msg": "epoch 0 step 5/10", "progress": True})
    plain = logging.makeLogRecord({"msg": "epoch 0 done"})
    console = ConsoleFilter()
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    assert not console.filter(line) and console.filter(plain)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    assert console.filter(line) and console.filter(plain)


def test_train_log_follows_every_long_phase(demo_store, tmp_path, monkeypatch):
    monkeypatch.setattr(repro.evaluate, "progress", functools.partial(progress_module.progress, every=0))
    train(tiny_cfg(demo_store, tmp_path, "schedule.max_epochs=1", "eval_batch_size=2", "log_every=1"))
    log = (tmp_path / "train.log").read_text()
    assert re.search(r"epoch 0 step 1/4 loss [\d.]+ .* img/s .* left \(this one step includes the loader's "
                     r"start-up\)\n", log)  # the training steps; the first alone, with the workers' start-up
    assert re.search(r"epoch 0 step 2/4 loss [\d.]+ .* img/s .* left\n", log)
    assert re.search(r"epoch 0 validation: 1/4 batch \(25%\), .* left", log)  # the end-of-epoch evaluation
    assert re.search(r"final evaluation 10crop: 3/4 batch \(75%\), .* left", log)  # the final 10 patches


def test_the_first_step_of_an_epoch_is_left_out_of_its_first_window_s_rate(monkeypatch):
    # The first step waits for the loader's workers to start (and cuDNN's autotuning): 8 s, in a 10 s step.
    now = [0.0]
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: now[0])
    one = torch.zeros(())
    for warm_up, expected in ((True, {"timed_steps": 2, "seconds": 2.0, "images_per_s": 4.0, "data_wait": 0.05,
                                      "warm_up": "left out"}),
                              (False, {"timed_steps": 3, "seconds": 12.0, "images_per_s": 1.0, "data_wait": 8.1 / 12,
                                       "warm_up": None})):
        now[0] = 0.0
        window = Window("cpu", warm_up=warm_up)
        for step_end, wait in ((10.0, 8.0), (11.0, 0.1), (12.0, 0.0)):
            window.data_wait += wait
            now[0] = step_end
            window.add(one, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 4)
        stats = window.close(World())
        assert {k: stats[k] for k in expected} == pytest.approx(expected) and stats["steps"] == 3
    now[0] = 0.0
    alone = Window("cpu", warm_up=True)  # a window of the first step alone is timed whole, and says so
    alone.data_wait, now[0] = 8.0, 10.0
    alone.add(one, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 4)
    stats = alone.close(World())
    assert (stats["seconds"], stats["data_wait"], stats["warm_up"]) == (10.0, 0.8, "included")
