"""The loader: a seeded order per epoch, resumable at any step, the skipped files left out, workers that outlive
the signals sent to a whole job."""

import multiprocessing
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repro.data import WORKER_IGNORES, batches
from repro.errors import StoreError
from repro.store import PreparedStore


def collect(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_same_seed_same_batches_and_every_row_once(demo_store):
    split = PreparedStore(demo_store).split("train")
    first = collect(batches(split, 8, seed=3, epoch=1, workers=0))
    again = collect(batches(split, 8, seed=3, epoch=1, workers=2))  # worker processes change nothing
    assert len(first) == len(split) // 8
    for (a, la), (b, lb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other_epoch = collect(batches(split, 8, seed=3, epoch=2, workers=0))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other_epoch))
    everything = collect(batches(split, 8, seed=3, epoch=1, workers=0, drop_last=False))
    images = torch.cat([b for b, _ in everything])
    store = np.load(demo_store / "train" / "images.npy", mmap_mode="r")
    assert len(images) == len(split)
    # each usable row exactly once: match rows by their checksum of pixels
    sums = sorted(int(x) for x in images.reshape(len(images), -1).sum(1, dtype=torch.int64))
    expected = sorted(int(store[r].sum(dtype=np.int64)) for r in split.rows)
    assert sums == expected


def test_workers_ignore_the_signals_sent_to_every_process_of_a_job(demo_store):
    # A terminal's Ctrl-C or SLURM's SIGTERM reaches the data workers too; a worker they killed would make the
    # training process fail ("DataLoader worker is killed by signal") while it stops cleanly (repro/loop.py).
    split = PreparedStore(demo_store).split("train")
    expected = collect(batches(split, 4, seed=0, workers=0))
    loader = iter(batches(split, 4, seed=0, workers=1, prefetch=1))
    got = [next(loader)]
    (worker,) = multiprocessing.active_children()
    for signum in WORKER_IGNORES:
        os.kill(worker.pid, signum)
    time.sleep(0.5)
    got += list(loader)
    assert len(got) == len(expected) and all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected))


def test_resume_at_step_k_gives_the_remaining_batches(demo_store):
    split = PreparedStore(demo_store).split("train")
    full = collect(batches(split, 4, seed=0, epoch=5, workers=0))
    for k in (1, len(full) // 2, len(full) - 1):
        resumed = collect(batches(split, 4, seed=0, epoch=5, start_step=k, workers=0))
        assert len(resumed) == len(full) - k
        assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(resumed, full[k:]))


def test_batches_hold_the_stored_images_and_labels(demo_store):
    split = PreparedStore(demo_store).split("val")
    store = np.load(demo_store / "val" / "images.npy", mmap_mode="r")
    labels = np.load(demo_store / "val" / "labels.npy")
    (images, got_labels), *_ = collect(batches(split, 5, shuffle=False, workers=0))
    assert images.dtype == torch.uint8 and images.shape == (5, 256, 256, 3)
    assert torch.equal(images, torch.from_numpy(store[split.rows[:5]].copy()))
    assert got_labels.tolist() == labels[split.rows[:5]].tolist()


def test_store_says_what_it_holds(demo_store):
    store = PreparedStore(demo_store)
    assert store.description == "the demo data"
    # real WNIDs: class folders of a few ILSVRC-2012 classes are numbered among its 1000 (repro.sources.classes)
    store.classes = [f"n0{i:07d}" for i in range(1000)]
    assert store.description == "a 4-class ImageNet subset"
    every_class = np.arange(1000)
    store.splits = {"val": SimpleNamespace(labels=every_class, rows=every_class)}
    assert store.description == "ILSVRC-2012"


def test_skipped_rows_are_never_served(demo_store):
    store = PreparedStore(demo_store)
    skipped = [s["row"] for s in store.manifest["splits"]["train"]["skipped"]]
    assert skipped, "the demo data holds one truncated training file"
    split = store.split("train")
    assert not set(skipped) & set(split.rows.tolist())
    assert len(split) == store.manifest["splits"]["train"]["rows"] - len(skipped)


def test_unfinished_or_missing_store_is_explained(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json.*make prepare-imagenet"):
        PreparedStore(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "progress.npy").write_bytes(b"")
    with pytest.raises(StoreError, match="did not finish: run the same prepare command again"):
        PreparedStore(tmp_path)
