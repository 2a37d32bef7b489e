"""One progress convention: a bar on a terminal, lines with the rate and the time left in the log; the console
drops the lines while a bar shows them, files keep them."""

import functools
import logging
import re

import repro.evaluate
from helpers import tiny_cfg
from repro import progress as progress_module
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
    assert re.search(r"epoch 0 step 1/4 loss [\d.]+ .* img/s .* left", log)  # the training steps
    assert re.search(r"epoch 0 validation: 1/4 batch \(25%\), .* left", log)  # the end-of-epoch evaluation
    assert re.search(r"final evaluation 10crop: 3/4 batch \(75%\), .* left", log)  # the final 10 patches
