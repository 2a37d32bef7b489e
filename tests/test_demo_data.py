"""The synthetic demo set: ILSVRC-2012's distribution layout, its odd files, determinism, learnable classes."""

import io
import json
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import command
from repro import demo_data
from repro.demo_data import DEVKIT_TAR, MAX_CLASSES, TRAIN_TAR, VAL_TAR, make_demo_data
from repro.errors import RunError
from repro.sources import read_devkit


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
    id_to_wnid, ground_truth, words = read_devkit(demo_raw / "ILSVRC2012_devkit_t12.tar.gz")
    assert [words[wnid] for wnid in info["wnids"]] == info["words"]
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


@pytest.mark.parametrize("argument, message", [("num_classes=0", "num_classes .*from 2 to 20"),
                                               ("num_classes=21", "num_classes .*from 2 to 20"),
                                               ("train_per_class=-1", "train_per_class .*at least 3"),
                                               ("clases=3", "clases")])
def test_bad_arguments_are_named(tmp_path, argument, message):
    result = subprocess.run(command("repro-demo-data", f"raw={tmp_path}", argument), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_torchvision_reads_the_archives(demo_raw, tmp_path, monkeypatch):
    """torchvision's ImageNet parsing (its parse_meta_mat and parse_val_groundtruth_txt, the nested train tars, the
    flat val tar) gives back the WNIDs, the words and every label."""
    imagenet = pytest.importorskip("torchvision.datasets.imagenet")
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)  # it checks the real archives' md5 sums
    for name in (TRAIN_TAR, VAL_TAR, DEVKIT_TAR):
        shutil.copy(demo_raw / name, tmp_path)  # torchvision extracts next to the archives
    info = json.loads((demo_raw / "demo_info.json").read_text())
    wnids = info["wnids"]

    imagenet.parse_devkit_archive(tmp_path)
    wnid_to_classes, val_wnids = imagenet.load_meta_file(tmp_path)
    assert wnid_to_classes == {wnid: (words,) for wnid, words in zip(wnids, info["words"])}
    assert val_wnids == [wnids[label] for label in info["val_labels"]]

    train = imagenet.ImageNet(tmp_path, split="train")
    assert train.wnids == wnids and sorted(train.targets) == train.targets
    assert [train.targets.count(label) for label in range(len(wnids))] == [12] * len(wnids)
    val = imagenet.ImageNet(tmp_path, split="val")
    for path, target in val.samples:
        assert target == info["val_labels"][int(re.search(r"_(\d{8})\.JPEG$", path).group(1)) - 1], path


def test_devkit_has_internal_synsets_and_a_permuted_id_order(demo_raw):
    import scipy.io

    info = json.loads((demo_raw / "demo_info.json").read_text())
    meta_mat = tar_members(demo_raw / DEVKIT_TAR)["ILSVRC2012_devkit_t12/data/meta.mat"]
    synsets = scipy.io.loadmat(io.BytesIO(meta_mat))["synsets"]
    assert synsets.shape == (len(info["wnids"]) + 2, 1)  # a column, as in the real devkit
    synsets = scipy.io.loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    ids = [int(s["ILSVRC2012_ID"]) for s in synsets]
    assert ids == list(range(1, len(synsets) + 1))
    leaves = {str(s["WNID"]): int(s["ILSVRC2012_ID"]) for s in synsets if s["num_children"] == 0}
    assert leaves == info["devkit_ids"]
    assert [leaves[wnid] for wnid in info["wnids"]] != sorted(leaves.values())
    internal = [s for s in synsets if s["num_children"] > 0]
    assert len(internal) == 2 and all(s["ILSVRC2012_ID"] > len(leaves) for s in internal)


def view_features(data, rng):
    """A grayscale training view of an image file (shorter side to 256, central 256, a random 224 crop, a random
    flip), summarised by its power spectrum pooled over half-octave frequency bands and 8 orientations: features
    blind to colour and to position, which see only the geometry."""
    image = Image.open(io.BytesIO(data)).convert("L")
    scale = 256 / min(image.size)
    image = image.resize((max(256, round(image.width * scale)), max(256, round(image.height * scale))))
    left = (image.width - 256) // 2 + rng.integers(0, 33)
    top = (image.height - 256) // 2 + rng.integers(0, 33)
    image = image.crop((left, top, left + 224, top + 224)).resize((112, 112))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    power = np.abs(np.fft.fft2((pixels - pixels.mean()) / (pixels.std() + 1e-3))) ** 2
    frequency = np.fft.fftfreq(112)
    radius = np.hypot(frequency[:, None], frequency[None, :])
    band = np.minimum((2 * np.log2(np.maximum(radius * 64, 1))).astype(int), 11)
    orientation = (np.arctan2(frequency[:, None], frequency[None, :]) % np.pi / np.pi * 8).astype(int) % 8
    return np.log1p(np.bincount((band * 8 + orientation).ravel(), power.ravel(), minlength=96))


def nearest_mean_accuracy(train, train_labels, val, val_labels):
    means = np.stack([train[train_labels == label].mean(axis=0) for label in range(MAX_CLASSES)])
    predicted = np.argmin(((val[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return (predicted == val_labels).mean()


def test_all_classes_are_distinct_after_crops_flips_and_grayscale(tmp_path):
    """Every supported class, the "small" variants included: a nearest-class-mean classifier on geometry alone
    labels the validation files far above chance (0.05), and falls to chance when the training labels are
    shuffled (so it is the classes, not the classifier, that make the difference)."""
    info = make_demo_data(tmp_path, num_classes=MAX_CLASSES, train_per_class=6, val_per_class=4, seed=3)
    rng = np.random.default_rng(0)
    train, train_labels = [], []
    for label, inner in enumerate(tar_members(tmp_path / TRAIN_TAR)[f"{w}.tar"] for w in info["wnids"]):
        for name, data in tar_members(io.BytesIO(inner)).items():
            if name not in info["truncated"]:
                train.append(view_features(data, rng))
                train_labels.append(label)
    val = [view_features(data, rng) for _, data in sorted(tar_members(tmp_path / VAL_TAR).items())]
    train, train_labels, val = np.stack(train), np.array(train_labels), np.stack(val)

    assert nearest_mean_accuracy(train, train_labels, val, info["val_labels"]) >= 0.7
    assert nearest_mean_accuracy(train, rng.permutation(train_labels), val, info["val_labels"]) <= 0.2


def test_an_interrupted_run_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    make_demo_data(tmp_path, num_classes=3, train_per_class=3, val_per_class=2, seed=5)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "meta_mat", interrupted)  # after both image tars, before the renames
    with pytest.raises(KeyboardInterrupt):
        make_demo_data(tmp_path, num_classes=3, train_per_class=3, val_per_class=2, seed=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEVKIT_TAR, TRAIN_TAR, VAL_TAR]  # no info, no .partial
    monkeypatch.undo()
    assert make_demo_data(tmp_path, num_classes=3, train_per_class=3, val_per_class=2, seed=6)["args"]["seed"] == 6


def test_bad_api_arguments_and_unwritable_out_are_named(tmp_path):
    with pytest.raises(RunError, match="num_classes must be an integer from 2 to 20, got 1"):
        make_demo_data(tmp_path, num_classes=1)
    with pytest.raises(RunError, match="val_per_class must be an integer at least 2, got -1"):
        make_demo_data(tmp_path, val_per_class=-1)
    (tmp_path / "a_file").write_text("")
    result = subprocess.run(command("repro-demo-data", f"raw={tmp_path / 'a_file'}"), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a_file" in result.stderr, result.stderr
