"""The store's two record formats and its one reader: a JPEG store prepared directly or converted from a raw one,
what `PreparedStore` checks at open, the records' CRC-32s checked as they are read, JPEG records decoded in the
loader's workers or as one batch on a device, restarts, and every damaged store of issue 22 named in one line."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import command, tiny_cfg
from repro import prepare as prepare_module
from repro.data import batches, decode_device
from repro.errors import PrepareError, RunError, StoreError
from repro.prepare import convert, prepare, start_split, stored_sources
from repro.store import IMAGE_BYTES, JpegRecords, PreparedStore, records_spec, sha256
from repro.train import train


def collect(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


def copy_of(store: Path, tmp_path: Path) -> Path:
    shutil.copytree(store, tmp_path / "store", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "store"


def edit_manifest(store: Path, change) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def converted_store(demo_store, tmp_path_factory) -> Path:
    """`demo_store` converted to JPEG records by `repro-convert`'s function."""
    out = tmp_path_factory.mktemp("converted") / "store"
    convert(demo_store, out, "jpeg", 95, workers=2)
    return out


def jpeg_records(store: Path, split: str = "train") -> dict[int, bytes]:
    part = PreparedStore(store).split(split)
    return {row: part.records.encoded([row])[0].numpy().tobytes() for row in part.rows.tolist()}


# -- the JPEG format, prepared or converted ------------------------------------------------------------------------


def test_a_jpeg_store_prepared_or_converted_from_raw_holds_the_same_records_and_statistics(
        demo_store, demo_jpeg_store, converted_store):
    prepared, converted, raw = (PreparedStore(s) for s in (demo_jpeg_store, converted_store, demo_store))
    assert prepared.records_spec == converted.records_spec == records_spec("jpeg", 95)
    assert raw.records_spec == {"format": "raw"}
    assert converted.manifest["converted_from"] == {"store": str(demo_store.resolve()), "records": {"format": "raw"}}
    for split in ("train", "val"):
        assert jpeg_records(demo_jpeg_store, split) == jpeg_records(converted_store, split)  # the encoder is exact
        for name in ("labels.npy", "sources.tsv"):
            assert (converted_store / split / name).read_bytes() == (demo_store / split / name).read_bytes()
        for key in ("rows", "count", "skipped"):
            assert converted.manifest["splits"][split][key] == raw.manifest["splits"][split][key]
    with np.load(demo_jpeg_store / "stats.npz") as a, np.load(converted_store / "stats.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_jpeg_records_take_a_sixth_of_raw_and_the_statistics_describe_the_decoded_pixels(demo_store, demo_jpeg_store):
    raw, jpeg = PreparedStore(demo_store).split("train"), PreparedStore(demo_jpeg_store).split("train")
    manifest = PreparedStore(demo_jpeg_store).manifest["splits"]["train"]
    assert manifest["bytes"] == (demo_jpeg_store / "train" / "jpegs.bin").stat().st_size
    assert manifest["bytes"] / manifest["count"] <= IMAGE_BYTES / 6
    decoded, exact = jpeg.records.read(jpeg.rows), raw.records.read(raw.rows)
    assert decoded.dtype == np.uint8 and decoded.shape == exact.shape == (len(raw), 256, 256, 3)
    assert 0 < np.abs(decoded.astype(int) - exact).mean() < 3  # grey levels
    with np.load(demo_jpeg_store / "stats.npz") as stats:
        np.testing.assert_allclose(stats["mean_image"], decoded.astype(np.float64).mean(axis=0), rtol=1e-12)
        assert int(stats["images"]) == len(jpeg)


@pytest.mark.parametrize("store", ["demo_store", "demo_jpeg_store"])
def test_the_loader_serves_either_format_as_uint8_batches_with_any_worker_count(store, request):
    split = PreparedStore(request.getfixturevalue(store)).split("train")
    first = collect(batches(split, 8, seed=3, epoch=1, workers=0))
    again = collect(batches(split, 8, seed=3, epoch=1, workers=2))
    assert len(first) == len(split) // 8
    for (a, la), (b, lb) in zip(first, again):
        assert a.dtype == torch.uint8 and a.shape == (8, 256, 256, 3)
        assert torch.equal(a, b) and torch.equal(la, lb)
    order = split.rows[np.random.default_rng([3, 1]).permutation(len(split))][:8]
    assert torch.equal(first[0][0], torch.from_numpy(split.records.read(order)))
    assert first[0][1].tolist() == split.labels[order].tolist()


def test_decoding_on_a_device_gets_the_workers_checked_records_and_decodes_each_batch_in_one_call(
        demo_jpeg_store, monkeypatch):
    """data.decode=gpu, without a GPU: the decoder is torchvision's decode_jpeg with a list and a CUDA device
    (nvJPEG, batched: torchvision/io/image.py sends a list to torch.ops.image.decode_jpegs_cuda); here a fake
    records its calls and decodes on the CPU."""
    import torchvision.io

    split = PreparedStore(demo_jpeg_store).split("train")
    expected = collect(batches(split, 8, seed=1, workers=0))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(collect(batches(split, 8, seed=1, workers=2,
                                                                            decode_on="cpu")), expected))
    real, calls = torchvision.io.decode_jpeg, []

    def fake_decode(records, mode, device):
        calls.append((len(records), torch.device(device), {(r.device.type, r.dtype, r.dim()) for r in records}))
        return real(records, mode=mode, device="cpu")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    got = collect(batches(split, 8, seed=1, workers=2, decode_on="cuda:0"))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(got, expected))
    assert calls == [(8, torch.device("cuda:0"), {("cpu", torch.uint8, 1)})] * len(expected)


def test_a_batch_the_decoder_refuses_is_decoded_record_by_record(demo_jpeg_store, monkeypatch):
    """nvJPEG can fail a batch as a whole (e.g. out of memory for its buffers) where each record decodes: the
    records are then decoded one at a time, and only a record that fails alone is named as damaged."""
    import torchvision.io

    records = PreparedStore(demo_jpeg_store).split("val").records
    expected = records.read([0, 1, 2])
    real = torchvision.io.decode_jpeg

    def refuses_batches(batch, mode, device):
        if len(batch) > 1:
            raise RuntimeError("a whole batch refused")
        return real(batch, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_batches)
    assert np.array_equal(records.read([0, 1, 2]), expected)


def test_gpu_decoding_is_refused_for_raw_records_and_for_a_cpu_tower(demo_store, demo_jpeg_store):
    assert decode_device("loader", PreparedStore(demo_store), "cpu") is None
    assert decode_device("gpu", PreparedStore(demo_jpeg_store), "cuda:0") == "cuda:0"
    with pytest.raises(RunError, match="holds raw records: leave data.decode=loader"):
        decode_device("gpu", PreparedStore(demo_store), "cuda:0")
    with pytest.raises(RunError, match="on the first tower's GPU, but it is on cpu"):
        decode_device("gpu", PreparedStore(demo_jpeg_store), "cpu")


# -- restarts, space, formats ----------------------------------------------------------------------------------------


def test_an_interrupted_jpeg_prepare_continues_to_the_same_records(demo_raw, demo_jpeg_store, tmp_path, monkeypatch):
    """A disk that fills up in the middle of a chunk's append (or a kill there): the partial chunk is cut off and
    its rows done again by the same command."""
    commit, calls = JpegRecords.commit, []

    def commit_onto_a_full_disk(self, results):
        calls.append(len(results))
        if len(calls) == 2:  # the second chunk: half its bytes reach the file, then ENOSPC
            with open(self.folder / "jpegs.bin", "ab") as f:
                f.write(results[0][2][:1000])
            raise OSError(28, "No space left on device")
        return commit(self, results)

    monkeypatch.setattr(JpegRecords, "commit", commit_onto_a_full_disk)
    out = tmp_path / "store"
    with pytest.raises(PrepareError, match=r"disk full: .*train could not take more records .* run the same command"):
        prepare(demo_raw, out, skip_bad=True, workers=1, chunk=16, record_format="jpeg")
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(JpegRecords, "commit", commit)
    prepare(demo_raw, out, skip_bad=True, workers=1, chunk=16, record_format="jpeg")
    assert jpeg_records(out) == jpeg_records(demo_jpeg_store)
    assert (out / "train" / "jpegs.bin").stat().st_size == (demo_jpeg_store / "train" / "jpegs.bin").stat().st_size


def test_a_jpeg_store_is_the_same_bytes_whatever_the_workers_and_chunks(demo_raw, demo_jpeg_store, tmp_path):
    """Records are appended in the order the chunks were made (not as workers finish them), so the same input gives
    the same files."""
    out = tmp_path / "store"
    prepare(demo_raw, out, skip_bad=True, workers=2, chunk=3, record_format="jpeg")
    for split in ("train", "val"):
        for name in ("jpegs.bin", "jpegs.npy", "crc32.npy", "labels.npy", "sources.tsv"):
            assert (out / split / name).read_bytes() == (demo_jpeg_store / split / name).read_bytes(), (split, name)


def test_a_skipped_rows_index_entry_is_empty_even_after_a_kill(tmp_path):
    """A row committed just before a kill, whose file then fails on the rerun, is skipped: its entry says so."""
    records = JpegRecords(tmp_path, records_spec("jpeg"))
    records.create(2)
    records.commit([(0, None, b"abc"), (1, None, b"defg")])
    assert records.finish(np.array([True, False])) == {"bytes": 3}
    assert np.load(tmp_path / "jpegs.npy").tolist() == [[0, 3], [0, 0]]


def test_the_statistics_pass_leaves_no_file_open(demo_jpeg_store):
    """It reads ILSVRC-2012's training split in ~20,000 chunks, opening the records for each: each must be closed."""
    store = PreparedStore(demo_jpeg_store)
    rows = store.split("train").rows[:2]
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(10):
        prepare_module._partial_sums((str(demo_jpeg_store / "train"), store.records_spec, rows))
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_the_space_check_counts_jpeg_records(demo_raw, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "free_space", lambda folder: 1_000_000)
    with pytest.raises(PrepareError, match=r"it needs 1\d\.\d MB \(64 images of at most about 48,000 bytes as JPEG "
                                           r"quality 95, .*\) but 1\.0 MB is free there"):
        prepare(demo_raw, tmp_path / "store", workers=1, record_format="jpeg")


def test_a_store_is_not_continued_or_reused_in_another_format(demo_raw, demo_store, tmp_path):
    with pytest.raises(PrepareError, match=r"already a complete store of format=raw records.*repro-convert "
                                           rf"source={demo_store} store=<new folder> format=jpeg quality=95"):
        prepare(demo_raw, demo_store, record_format="jpeg")
    sources = prepare_module.plan(demo_raw, skip_bad=True)["splits"]["val"]["sources"]
    start_split(tmp_path, "val", sources, records_spec("raw"))
    with pytest.raises(PrepareError, match=r"started in another format than format=jpeg \(it has no jpegs.bin\)"):
        start_split(tmp_path, "val", sources, records_spec("jpeg"))
    with pytest.raises(PrepareError, match="is the source store itself"):
        convert(demo_store, demo_store)
    # nor continued another way: another quality, another draft, another source store
    start_split(tmp_path, "train", sources, records_spec("jpeg", 95), {"draft": True})
    with pytest.raises(PrepareError, match=r"was started with records=\{.*\"quality\": 95.*, not \{.*\"quality\": 90"):
        start_split(tmp_path, "train", sources, records_spec("jpeg", 90), {"draft": True})
    with pytest.raises(PrepareError, match=r"was started with draft=true, not false: its rows would be made two ways"):
        start_split(tmp_path, "train", sources, records_spec("jpeg", 95), {"draft": False})


def test_a_finished_conversion_is_left_alone_even_without_its_source(converted_store, tmp_path):
    manifest = convert(tmp_path / "gone", converted_store, "jpeg", 95)
    assert manifest == PreparedStore(converted_store).manifest


def test_a_damaged_sources_table_stops_a_conversion_naming_it(demo_store, tmp_path):
    store = copy_of(demo_store, tmp_path)
    path = store / "val" / "sources.tsv"
    path.write_text(path.read_text().replace("\t", " ", 1))
    with pytest.raises(StoreError, match=r"split val: sources.tsv does not match the sha256 the manifest recorded"):
        stored_sources(PreparedStore(store), "val")
    edit_manifest(store, lambda manifest: manifest["splits"]["val"]["sha256"].pop("sources.tsv"))
    with pytest.raises(PrepareError, match=r"sources.tsv, line 1: .* is not name, path, offset and size"):
        stored_sources(PreparedStore(store), "val")


def test_a_store_of_format_1_still_opens_as_raw(demo_store, tmp_path):
    old = copy_of(demo_store, tmp_path)

    def as_written_by_version_1(manifest):
        manifest["format"] = "repro-prepared-store/1"
        del manifest["records"], manifest["stats"]["sha256"]

    edit_manifest(old, as_written_by_version_1)
    store = PreparedStore(old)
    assert store.record_format == "raw"
    split, reference = store.split("val"), PreparedStore(demo_store).split("val")
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(collect(batches(split, 4, workers=0)),
                                                           collect(batches(reference, 4, workers=0))))
    edit_manifest(old, lambda manifest: manifest.update(format="repro-prepared-store/3"))
    with pytest.raises(StoreError, match="format 'repro-prepared-store/3' is not one this version of repro reads"):
        PreparedStore(old)


def test_the_format_comes_from_the_manifest_not_the_files(demo_jpeg_store, tmp_path):
    store = copy_of(demo_jpeg_store, tmp_path)
    edit_manifest(store, lambda manifest: manifest.update(records={"format": "raw"}))
    with pytest.raises(StoreError, match=rf"store {store}, split \w+: images.npy is missing"):
        PreparedStore(store)


# -- a damaged store: one line naming the store, the split and the row ---------------------------------------------


def flip_every_4k(path: Path, start: int = 0) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(start, len(data), 4096):
        data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, by: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, path.stat().st_size - by))


def set_rows(count: int):
    return lambda store: edit_manifest(store, lambda m: m["splits"]["train"].update(rows=count))


def set_label(row: int, value: int):
    def damage(store):
        labels = np.load(store / "train" / "labels.npy")
        labels[row] = value
        np.save(store / "train" / "labels.npy", labels)
    return damage


def cut_a_record(store: Path) -> None:
    """A truncated JPEG record behind a consistent-looking index: its size lowered and the manifest's sha256 of the
    index updated, as a buggy writer would leave it."""
    index = np.load(store / "train" / "jpegs.npy")
    index[5, 1] //= 2
    np.save(store / "train" / "jpegs.npy", index)
    digest = sha256(store / "train" / "jpegs.npy")
    edit_manifest(store, lambda m: m["splits"]["train"]["sha256"].update({"jpegs.npy": digest}))


# (store, damage, where it is found, the message after "store S, split train", the row named: a number, "any" for
# whichever row is read first, None for none)
DAMAGE = {
    "raw: a byte flipped in every 4 KiB of the images": (
        "demo_store", lambda s: flip_every_4k(s / "train" / "images.npy", 200), "read",
        "its record does not match its CRC-32", "any"),
    "jpeg: a byte flipped in every 4 KiB of the records": (
        "demo_jpeg_store", lambda s: flip_every_4k(s / "train" / "jpegs.bin", 1000), "read",
        "its record does not match its CRC-32", "any"),
    "the manifest's row count lowered below the file's": (
        "demo_store", set_rows(10), "open", "the manifest counts 10 rows but labels.npy holds 48", 10),
    "the manifest's row count raised to 10**12": (
        "demo_store", set_rows(10**12), "open", "the manifest counts 1,000,000,000,000 rows but labels.npy holds 48",
        48),
    "the manifest's row count raised above the file's": (
        "demo_jpeg_store", set_rows(60), "open", "the manifest counts 60 rows but labels.npy holds 48", 48),
    "the images file truncated by 5 MB": (
        "demo_store", lambda s: truncate(s / "train" / "images.npy", 5_000_000), "open",
        "images.npy is truncated (4,437,312 bytes of 9,437,312): this row and the ones after it are missing", 22),
    "the JPEG records file truncated": (
        "demo_jpeg_store", lambda s: truncate(s / "train" / "jpegs.bin", 500_000), "open",
        "is not within jpegs.bin", "any"),
    "a label above the classes": (
        "demo_store", set_label(5, 57), "open", "label 57 is not one of the store's 4 classes (0 to 3)", 5),
    "a label below zero": ("demo_jpeg_store", set_label(7, -1), "open", "label -1 is not one of the store's 4", 7),
    "labels.npy missing": ("demo_store", lambda s: (s / "train" / "labels.npy").unlink(), "open",
                           "labels.npy is missing", None),
    "a label changed within the classes": (  # row 3 is of class 0
        "demo_store", set_label(3, 1), "open", "labels.npy does not match the sha256 the manifest recorded", None),
    "a truncated JPEG record": ("demo_jpeg_store", cut_a_record, "read", "its record does not match its CRC-32", 5),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_store_is_named_in_one_line_with_its_split_and_row(case, request, tmp_path):
    fixture, damage, found, message, row = DAMAGE[case]
    store = copy_of(request.getfixturevalue(fixture), tmp_path)
    damage(store)
    with pytest.raises(StoreError) as error:
        split = PreparedStore(store).split("train")
        assert found == "read", "a damage that can be known at open is found there"
        collect(batches(split, 16, workers=2, drop_last=False))
    text = str(error.value)
    assert text.startswith(f"store {store}, split train") and message in text and "\n" not in text, text
    named = re.match(rf"store {re.escape(str(store))}, split train, row ([\d,]+): ", text)
    if row is None:
        assert named is None, text
    elif row == "any":
        assert named, text
    else:
        assert named and int(named.group(1).replace(",", "")) == row, text
    assert "prepare it again" in text


def test_unchecked_reads_let_bit_rot_through_but_never_a_record_that_does_not_decode(demo_jpeg_store, tmp_path):
    store = copy_of(demo_jpeg_store, tmp_path)
    cut_a_record(store)
    split = PreparedStore(store, verify=False).split("train")
    with pytest.raises(StoreError, match=rf"store {store}, split train, row 5: its JPEG record cannot be decoded "
                                         r"\(Image is incomplete or truncated\)"):
        split.records.read(split.rows)
    assert len(split.records.read([6])) == 1  # the others read
    flip_every_4k(store / "train" / "jpegs.bin", 1000)  # libjpeg decodes flipped bits without a word
    assert len(split.records.read([20, 30])) == 2
    with pytest.raises(StoreError, match="row 20: its record does not match its CRC-32"):
        PreparedStore(store).split("train").records.read([20, 30])


def test_a_run_refuses_a_damaged_store_before_it_makes_anything(demo_store, tmp_path):
    store = copy_of(demo_store, tmp_path)
    set_rows(10**12)(store)
    with pytest.raises(StoreError, match=r"split train, row 48: the manifest counts 1,000,000,000,000 rows"):
        train(tiny_cfg(store, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "row 48" in json.loads((tmp_path / "run" / "failed.json").read_text())["error"]


def test_a_damaged_record_stops_training_naming_it(demo_jpeg_store, tmp_path):
    """The quick sibling of the next test: the error a loader worker finds reaches train() as itself."""
    store = copy_of(demo_jpeg_store, tmp_path)
    flip_every_4k(store / "train" / "jpegs.bin", 1000)
    with pytest.raises(StoreError, match=rf"^store {store}, split train, row \d+: its record does not match"):
        train(tiny_cfg(store, tmp_path / "run", "data.workers=1"))


@pytest.mark.slow
def test_a_damaged_record_stops_training_with_one_line(demo_store, tmp_path):
    """Through the real entry point: found by the loader's worker during the first epoch, after the run began."""
    store = copy_of(demo_store, tmp_path)
    flip_every_4k(store / "train" / "images.npy", 200)
    result = subprocess.run(command("repro-train", "experiment=tiny", f"data.store={store}", "data.workers=1",
                                    f"hydra.run.dir={tmp_path / 'run'}"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(rf"repro-train: error: store {re.escape(str(store))}, split train, row \d+: its record does not "
                     "match its CRC-32", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "split train, row" in json.loads((tmp_path / "run" / "failed.json").read_text())["error"]
