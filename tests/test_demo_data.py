"""The synthetic demo set: ILSVRC-2012's distribution layout, its odd files, determinism, learnable classes."""

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from repro.demo_data import make_demo_data
from repro.prepare import read_devkit


def tar_members(source):
    """{name: bytes} of a tar given as a path or a file object."""
    with tarfile.open(source) if not isinstance(source, io.BytesIO) else tarfile.open(fileobj=source) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_layout_is_ilsvrc_2012s(demo_raw):
    info = json.loads((demo_raw / "demo_info.json").read_text())
    train = tar_members(demo_raw / "ILSVRC2012_img_train.tar")
    assert sorted(train) == [f"{wnid}.tar" for wnid in info["wnids"]]
    for wnid in info["wnids"]:
        assert sorted(tar_members(io.BytesIO(train[f"{wnid}.tar"]))) == sorted(f"{wnid}_{n}.JPEG" for n in range(1, 13))
    val = tar_members(demo_raw / "ILSVRC2012_img_val.tar")
    assert sorted(val) == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 17)]


def test_devkit_ids_differ_from_sorted_order_and_label_the_val_files(demo_raw):
    info = json.loads((demo_raw / "demo_info.json").read_text())
    id_to_wnid, ground_truth = read_devkit(demo_raw / "ILSVRC2012_devkit_t12.tar.gz")
    assert sorted(id_to_wnid.values()) == info["wnids"] and sorted(id_to_wnid) == [1, 2, 3, 4]
    assert id_to_wnid[1] != info["wnids"][0]  # ID order is not sorted-WNID order
    assert [info["wnids"].index(id_to_wnid[i]) for i in ground_truth] == info["val_labels"]


def test_odd_files_are_what_they_claim(demo_raw):
    info = json.loads((demo_raw / "demo_info.json").read_text())
    files = dict(tar_members(demo_raw / "ILSVRC2012_img_val.tar"))
    for inner in tar_members(demo_raw / "ILSVRC2012_img_train.tar").values():
        files.update(tar_members(io.BytesIO(inner)))
    assert info["grayscale"] and info["cmyk"] and len(info["png_as_jpeg"]) == 1 and len(info["truncated"]) == 1
    for name in info["grayscale"]:
        assert Image.open(io.BytesIO(files[name])).mode == "L"
    for name in info["cmyk"]:
        assert Image.open(io.BytesIO(files[name])).mode == "CMYK"
    assert Image.open(io.BytesIO(files[info["png_as_jpeg"][0]])).format == "PNG"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(files[info["truncated"][0]])).load()
    sizes = {Image.open(io.BytesIO(data)).size for name, data in files.items() if name not in info["truncated"]}
    assert len(sizes) > len(files) // 2 and min(min(s) for s in sizes) < 256 < max(max(s) for s in sizes)


def test_same_seed_same_bytes_and_rerun_does_nothing(tmp_path):
    make_demo_data(tmp_path / "a", num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    make_demo_data(tmp_path / "b", num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz",
                 "demo_info.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    before = (tmp_path / "a" / "ILSVRC2012_img_train.tar").stat().st_mtime_ns
    make_demo_data(tmp_path / "a", num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    assert (tmp_path / "a" / "ILSVRC2012_img_train.tar").stat().st_mtime_ns == before
    make_demo_data(tmp_path / "c", num_classes=3, train_per_class=3, val_per_class=2, seed=6)
    assert (tmp_path / "c" / "ILSVRC2012_img_val.tar").read_bytes() != (tmp_path / "a" / "ILSVRC2012_img_val.tar"
                                                                         ).read_bytes()


def spectrum_features(store, split):
    """Translation-invariant features: the log magnitude spectrum of each grayscale 64x64 image."""
    images = np.load(store / split / "images.npy")
    grey = images.astype(np.float32).mean(axis=-1)[:, ::4, ::4]
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.fft2(grey)).reshape(len(images), -1))


def test_classes_are_distinct_beyond_colour(demo_store):
    """A nearest-class-mean classifier on grayscale spectra (no colour, no position) beats chance by far."""
    manifest = json.loads((demo_store / "manifest.json").read_text())
    skipped = {s["row"] for s in manifest["splits"]["train"]["skipped"]}
    train, val = spectrum_features(demo_store, "train"), spectrum_features(demo_store, "val")
    train_labels = np.load(demo_store / "train" / "labels.npy")
    val_labels = np.load(demo_store / "val" / "labels.npy")
    keep = [r for r in range(len(train)) if r not in skipped]
    means = np.stack([train[keep][train_labels[keep] == c].mean(axis=0) for c in range(4)])
    predicted = np.argmin(((val[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == val_labels).mean()
    assert accuracy >= 0.75, accuracy  # chance is 0.25


@pytest.mark.parametrize("argument, message", [("--classes=0", "--classes: .*from 2 to 20"),
                                               ("--classes=21", "--classes: .*from 2 to 20"),
                                               ("--train-per-class=-1", "--train-per-class: .*at least 3")])
def test_bad_arguments_are_named(tmp_path, argument, message):
    result = subprocess.run([sys.executable, "-m", "repro.demo_data", "--out", str(tmp_path), argument],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
