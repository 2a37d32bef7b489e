"""Preparing ILSVRC-2012: layouts, labels, the paper's resize and crop, odd files, restarts, statistics."""

import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit import write_devkit
from helpers import command
from repro.errors import PrepareError
from repro.prepare import load_256, prepare
from repro.store import PreparedStore, open_records, records_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MINI, META = SHARED / "imagenet-mini", SHARED / "imagenet-meta"
needs_shared = pytest.mark.skipif(not (MINI.is_dir() and META.is_dir()),
                                  reason=f"real ImageNet samples not found at {SHARED} (only in the dev checkout)")


def by_hand(path_or_bytes) -> np.ndarray:
    """§2 with plain Pillow: RGB, shorter side to 256 (bilinear), central 256x256."""
    image = Image.open(path_or_bytes if isinstance(path_or_bytes, Path) else io.BytesIO(path_or_bytes))
    image = image.convert("RGB")
    w, h = image.size
    size = (max(256, round(w * 256 / min(w, h))), max(256, round(h * 256 / min(w, h))))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - 256) // 2, (size[1] - 256) // 2
    return np.asarray(image.crop((left, top, left + 256, top + 256)))


def jpeg_bytes(size=(300, 200), mode="RGB", seed=0, fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def small_raw(root: Path, bad: dict[str, bytes] | None = None) -> Path:
    """train/<wnid>/ folders of two made-up classes, three good JPEGs each, plus any `bad` files."""
    for c, wnid in enumerate(("n00000002", "n00000001")):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(seed=10 * c + i))
    for name, data in (bad or {}).items():
        (root / "train" / "n00000001" / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory):
    """imagenet-mini (real files) with a devkit made from the real devkit's text files."""
    raw = tmp_path_factory.mktemp("mini_raw")
    (raw / "train").symlink_to(MINI / "train")
    (raw / "val").symlink_to(MINI / "val")
    rows = list(csv.DictReader(open(META / "classes.csv")))
    write_devkit(raw / "ILSVRC2012_devkit_t12", {int(r["ilsvrc2012_id"]): r["wnid"] for r in rows},
                 (META / "ILSVRC2012_validation_ground_truth.txt").read_text().split())
    out = tmp_path_factory.mktemp("mini_store")
    prepare(raw, out, workers=2, draft=False)
    return out


@needs_shared
def test_real_images_get_the_devkits_sorted_wnid_labels(mini_store):
    manifest = json.loads((mini_store / "manifest.json").read_text())
    classes = {r["wnid"]: int(r["sorted_index"]) for r in csv.DictReader(open(META / "classes.csv"))}
    assert manifest["classes"] == sorted(classes) and len(classes) == 1000
    assert manifest["splits"]["train"]["count"] == 101 and manifest["splits"]["val"]["count"] == 200
    sources = (mini_store / "train" / "sources.tsv").read_text().splitlines()
    labels = np.load(mini_store / "train" / "labels.npy")
    assert [classes[line.split("/")[1]] for line in sources] == labels.tolist()
    truth = [int(x) for x in (META / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    id_to_wnid = {int(r["ilsvrc2012_id"]): r["wnid"] for r in csv.DictReader(open(META / "classes.csv"))}
    val_sources = (mini_store / "val" / "sources.tsv").read_text().splitlines()
    val_labels = np.load(mini_store / "val" / "labels.npy")
    for line, label in zip(val_sources, val_labels):
        number = int(line.split("\t")[0][-13:-5])
        assert label == classes[id_to_wnid[truth[number - 1]]]
    # line 1 of the ground truth: 490 = n01751748 (sea snake) = sorted index 65
    assert classes[id_to_wnid[truth[0]]] == 65


@needs_shared
def test_real_images_are_resized_and_centre_cropped_like_pillow_by_hand(mini_store):
    images = np.load(mini_store / "train" / "images.npy", mmap_mode="r")
    sources = [line.split("\t") for line in (mini_store / "train" / "sources.tsv").read_text().splitlines()]
    picks = [i for i, s in enumerate(sources) if s[0].endswith("n02105855_2933.JPEG")] + [0, 17, 60, 100]
    assert len(picks) == 5, "the real PNG-named-.JPEG file is in imagenet-mini"
    for row in picks:
        assert np.array_equal(images[row], by_hand(Path(sources[row][1]))), sources[row][0]


@needs_shared
def test_draft_changes_large_jpegs_only_within_resize_noise():
    sizes = []
    for path in sorted((MINI / "train").glob("*/*.JPEG"))[:40]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or min(image.size) < 512:
                continue
        sizes.append(np.abs(load_256(data, draft=True).astype(int) - load_256(data, draft=False)).mean())
    assert sizes, "imagenet-mini holds JPEGs with a shorter side of 512 or more"
    assert np.mean(sizes) < 3.0  # mean absolute difference in 0..255 units


def test_bad_files_are_listed_after_everything_else_is_done(tmp_path):
    good = jpeg_bytes(seed=99)
    raw = small_raw(tmp_path / "raw", bad={"empty.JPEG": b"", "text.JPEG": b"not an image",
                                           "truncated.JPEG": good[: len(good) // 2]})
    out = tmp_path / "out"
    with pytest.raises(PrepareError) as error:
        prepare(raw, out, workers=1)
    message = str(error.value)
    for name in ("empty.JPEG", "text.JPEG", "truncated.JPEG"):
        assert f"train/n00000001/{name}" in message
    assert "skip_bad=true" in message and not (out / "manifest.json").exists()
    progress = np.load(out / "train" / "progress.npy")
    assert (progress == 1).sum() == 6 and (progress == 2).sum() == 3  # the good ones were all converted

    manifest = prepare(raw, out, skip_bad=True, workers=1)
    skipped = manifest["splits"]["train"]["skipped"]
    assert sorted(s["file"] for s in skipped) == [f"train/n00000001/{n}" for n in
                                                   ("empty.JPEG", "text.JPEG", "truncated.JPEG")]
    assert manifest["splits"]["train"]["count"] == 6


def test_odd_but_valid_files_become_rgb(tmp_path):
    raw = small_raw(tmp_path / "raw", bad={"png.JPEG": jpeg_bytes(fmt="PNG", seed=1),
                                           "cmyk.JPEG": jpeg_bytes(mode="CMYK", seed=2),
                                           "grey.JPEG": jpeg_bytes(mode="L", size=(200, 500), seed=3)})
    prepare(raw, tmp_path / "out", workers=1)
    images = np.load(tmp_path / "out" / "train" / "images.npy")
    names = [s.split("\t")[0] for s in (tmp_path / "out" / "train" / "sources.tsv").read_text().splitlines()]
    for name in ("png.JPEG", "cmyk.JPEG", "grey.JPEG"):
        row = names.index(f"train/n00000001/{name}")
        assert np.array_equal(images[row], by_hand(raw / "train" / "n00000001" / name))
    grey = images[names.index("train/n00000001/grey.JPEG")]
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_labels_follow_sorted_wnids_not_folder_order(tmp_path):
    raw = small_raw(tmp_path / "raw")
    manifest = prepare(raw, tmp_path / "out", workers=1)
    assert manifest["classes"] == ["n00000001", "n00000002"]
    assert np.load(tmp_path / "out" / "train" / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    # no devkit, so no names: the store names its classes by WNID
    assert manifest["class_names"] is None and PreparedStore(tmp_path / "out").class_names == manifest["classes"]


@pytest.mark.parametrize("setup, message", [
    (lambda raw: None, "holds no ILSVRC-2012 images"),
    (lambda raw: (raw / "val").mkdir() or (raw / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x"),
     "labels must come from the devkit"),
    (lambda raw: small_raw(raw) and write_devkit(raw / "ILSVRC2012_devkit_t12", {1: "n00000001", 2: "n00000003"},
                                                 ["1"]),
     "train/n00000002: 'n00000002' is not one of the 2 classes of the devkit"),
])
def test_bad_layouts_are_explained(tmp_path, setup, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    setup(raw)
    with pytest.raises(PrepareError, match=message):
        prepare(raw, tmp_path / "out", workers=1)


def test_command_line_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(command("repro-prepare", f"raw={tmp_path / 'nowhere'}", f"store={tmp_path / 'o'}"),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "repro-prepare: error:" in result.stderr and "is not a folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("record_format", ["raw", pytest.param("jpeg", marks=pytest.mark.slow)])
def test_killed_prepare_resumes_to_the_same_store(tmp_path, record_format):
    # large noisy JPEGs decoded at full size, so that a kill lands in the middle of the conversion (the JPEG
    # records' restart has a quick test of its own: tests/test_store.py)
    raw = tmp_path / "raw"
    for c in range(2):
        folder = raw / "train" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(30):
            (folder / f"{i}.JPEG").write_bytes(jpeg_bytes(size=(1400, 1000), seed=100 * c + i))
    reference = tmp_path / "reference"
    prepare(raw, reference, workers=1, draft=False, record_format=record_format)
    out = tmp_path / "killed"
    prepare_command = command("repro-prepare", f"raw={raw}", f"store={out}", "workers=1", "draft=false",
                              f"format={record_format}")
    progress_file = out / "train" / "progress.npy"
    for threshold in (3, 20):  # kill twice, at different points of the conversion
        process = subprocess.Popen(prepare_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                done = int((np.load(progress_file) != 0).sum())
            except (ValueError, OSError, EOFError):  # not there yet, or being replaced
                done = 0
            if done >= threshold:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the prepare finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists(), "the store must not look complete after a kill"
        assert int((np.load(progress_file) != 0).sum()) < 60
    subprocess.run(prepare_command, check=True, capture_output=True)
    for name in ("labels.npy", "sources.tsv", *open_records(out / "train", records_spec(record_format)).files):
        assert (out / "train" / name).read_bytes() == (reference / "train" / name).read_bytes(), name
    with np.load(out / "stats.npz") as a, np.load(reference / "stats.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_statistics_match_numpy(demo_store):
    images = np.load(demo_store / "train" / "images.npy")
    manifest = json.loads((demo_store / "manifest.json").read_text())
    skipped = {s["row"] for s in manifest["splits"]["train"]["skipped"]}
    used = images[[r for r in range(len(images)) if r not in skipped]].astype(np.float64)
    pixels = used.reshape(-1, 3)
    with np.load(demo_store / "stats.npz") as stats:
        np.testing.assert_allclose(stats["mean_image"], used.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats["pixel_cov"], np.cov(pixels, rowvar=False, bias=True), rtol=1e-9)
        vals, vecs = stats["eigvals"], stats["eigvecs"]
        assert np.all(np.diff(vals) <= 0)
        np.testing.assert_allclose(stats["pixel_cov"] @ vecs, vecs * vals, rtol=1e-9, atol=1e-9)


def test_demo_archives_prepare_to_the_labels_the_generator_recorded(demo_raw, demo_store):
    info = json.loads((demo_raw / "demo_info.json").read_text())
    manifest = json.loads((demo_store / "manifest.json").read_text())
    assert manifest["classes"] == info["wnids"] and manifest["class_names"] == info["words"]  # the devkit's words
    assert manifest["splits"]["train"]["layout"].startswith("ILSVRC2012_img_train.tar")
    assert manifest["splits"]["val"]["layout"].startswith("ILSVRC2012_img_val.tar")
    # validation labels come through the devkit (its ID order differs from sorted order)
    assert np.load(demo_store / "val" / "labels.npy").tolist() == info["val_labels"]
    train_names = [line.split("\t")[0] for line in (demo_store / "train" / "sources.tsv").read_text().splitlines()]
    train_labels = np.load(demo_store / "train" / "labels.npy")
    assert [info["wnids"][label] for label in train_labels] == [name.split("/")[1] for name in train_names]
    # the truncated file is the one skipped; the CMYK, grayscale and PNG-named files became RGB rows
    assert [s["file"].split("/")[-1] for s in manifest["splits"]["train"]["skipped"]] == info["truncated"]
    images = np.load(demo_store / "train" / "images.npy", mmap_mode="r")
    for name in info["png_as_jpeg"] + [n for n in info["cmyk"] + info["grayscale"] if not n.startswith("ILSVRC")]:
        row = [n.split("/")[-1] for n in train_names].index(name)
        assert images[row].std() > 10, name  # a real picture, not an empty row
