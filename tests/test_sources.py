"""Every layout of ILSVRC-2012 `repro-prepare` reads (repro/sources/): the same images give the same store, the
labels are checked against each source's class list, and bad input gets one line before any work."""

import csv
import importlib.util
import gzip
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from layouts import WRITERS, demo_images, parquet_table
from repro.cli import prepare_main
from repro.config import composed
from repro.errors import PrepareError, RunError
from repro.prepare import parallel, prepare
from repro.sources import LAYOUTS, Reader, chunks, plan
from repro.sources import reading
from repro.sources.classes import ilsvrc2012, names_are_ilsvrc2012

META = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-meta"
HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None
# a mark rather than importorskip, so that a skipped test does not build its fixtures first
needs_pyarrow = pytest.mark.skipif(not HAVE_PYARROW, reason="needs pyarrow, the optional extra that make test "
                                                            "installs: .venv/bin/pip install -e '.[parquet]'")


@pytest.fixture(scope="session")
def images(demo_raw):
    return demo_images(demo_raw)


@pytest.fixture(scope="session")
def layouts(images, tmp_path_factory) -> dict[str, Path]:
    """The demo set in every layout but the archives (demo_raw itself), each in a folder of its own."""
    root = tmp_path_factory.mktemp("layouts")
    return {name: write(images, root / name) for name, write in WRITERS.items() if HAVE_PYARROW or name != "hf_parquet"}


def copy(layouts, name: str, tmp_path: Path) -> Path:
    """A copy of one layout to damage."""
    return Path(shutil.copytree(layouts[name], tmp_path / name))


def rows_and_bytes(work: dict) -> dict:
    """Each split's (name, label) rows and each row's bytes, read the way the conversion reads them."""
    reader, result = Reader(), {}
    for split, info in work["splits"].items():
        data = {}
        for chunk in chunks(list(enumerate(info["sources"])), 5):
            data |= {row: d if d is not None else reader.read(source) for row, source, d in chunk}
        result[split] = [(s.name, s.label, data[row]) for row, s in enumerate(info["sources"])]
    return result


def test_every_layout_is_recognised_and_lists_the_same_rows_labels_and_bytes(demo_raw, layouts):
    reference = plan(demo_raw, skip_bad=True)
    expected = rows_and_bytes(reference)
    assert set(LAYOUTS) == {"archives", *WRITERS}
    for name, raw in layouts.items():
        work = plan(raw)
        assert work["source"]["layout"] == name and work["classes"] == reference["classes"], name
        assert rows_and_bytes(work) == expected, name
        assert plan(raw, source=name)["source"] == work["source"]


@pytest.mark.parametrize("layout", ["hf_tar", pytest.param("hf_parquet", marks=needs_pyarrow),
                                    pytest.param("folders", marks=pytest.mark.slow),
                                    pytest.param("kaggle", marks=pytest.mark.slow),
                                    pytest.param("wds", marks=pytest.mark.slow)])
def test_every_layout_prepares_the_same_store(layouts, demo_store, tmp_path, layout):
    manifest = prepare(layouts[layout], tmp_path / "store", skip_bad=True, workers=1)
    assert manifest["source"]["layout"] == layout and manifest["source"]["files"]
    for split in ("train", "val"):
        for name in ("images.npy", "labels.npy", "crc32.npy"):
            assert (tmp_path / "store" / split / name).read_bytes() == (demo_store / split / name).read_bytes(), name
    with np.load(tmp_path / "store" / "stats.npz") as ours, np.load(demo_store / "stats.npz") as theirs:
        assert ours.files == theirs.files and all(np.array_equal(ours[k], theirs[k]) for k in ours.files)


def test_shards_are_indexed_in_worker_processes_as_a_real_preparation_does(layouts):
    """prepare() indexes shards with `parallel` (one shard a task, results in any order) unless workers=1."""
    for name in ("hf_tar", "wds"):
        assert plan(layouts[name], pool_map=partial(parallel, workers=2)) == plan(layouts[name]), name


@needs_pyarrow
def test_tar_gz_shards_are_read_once_in_order_and_parquet_a_row_group_a_chunk(layouts, monkeypatch):
    opened, gzip_open = [], gzip.open
    monkeypatch.setattr(reading.gzip, "open", lambda path, mode: opened.append(path) or gzip_open(path, mode))
    work = plan(layouts["hf_tar"])
    todo = {split: list(enumerate(info["sources"]))[::3] for split, info in work["splits"].items()}  # a restart's
    read = {split: [(row, data) for chunk in chunks(rows, 4) for row, _, data in chunk] for split, rows in todo.items()}
    assert sorted(opened) == sorted({s.path for info in work["splits"].values() for s in info["sources"]})
    reader = Reader()
    for split, rows in read.items():
        assert sorted(row for row, _ in rows) == [row for row, _ in todo[split]]
        assert all(data == reader.read(work["splits"][split]["sources"][row]) for row, data in rows)
    sources = plan(layouts["hf_parquet"])["splits"]["train"]["sources"]
    groups = [{(s.path, s.offset) for _, s, _ in chunk} for chunk in chunks(list(enumerate(sources)), 4)]
    assert all(len(group) == 1 for group in groups) and len(groups) == len({(s.path, s.offset) for s in sources})


def test_a_reader_keeps_one_file_open(tmp_path):
    """A million class-folder files read by one worker must not each stay open (the process's limit is ~1024)."""
    files, handles = [], []
    for i in range(3):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * 10)
    reader = Reader()
    for i, file in enumerate(files):
        assert reader.read(reading.Source(f"x/{i}", str(file), 2, 3, 0)) == bytes([i]) * 3
        handles.append(reader.file)
    assert [handle.closed for handle in handles] == [True, True, False]


# ----------------------------------------------------------------------------------------------------------------
# Labels


@needs_pyarrow
def test_labels_in_another_order_are_refused(layouts, tmp_path):
    import pyarrow.parquet as pq

    raw = copy(layouts, "hf_parquet", tmp_path)
    path = raw / "data" / "validation-00000-of-00001.parquet"
    table = pq.read_table(path)
    rows = [(r["image"]["bytes"], r["image"]["path"], (r["label"] + 1) % 4) for r in table.to_pylist()]
    pq.write_table(parquet_table(rows, json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]
                                 ["names"]), path)
    with pytest.raises(PrepareError, match="validation-00000-of-00001.parquet, row group 0, row 0: label .* its "
                                           "integers follow another order"):
        plan(raw)

    raw = copy(layouts, "wds", tmp_path)
    shard = raw / "imagenet1k-train-0002.tar"
    import tarfile
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    from layouts import _write_tar
    _write_tar(shard, [(n, str((int(d) + 1) % 4).encode() if n.endswith(".cls") else d) for n, d in members])
    with pytest.raises(PrepareError, match="imagenet1k-train-0002.tar: .*cls says .* the .cls integers follow another "
                                           "order"):
        plan(raw)


def test_the_packaged_class_list_is_ilsvrc2012s():
    wnids, words = ilsvrc2012()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    if not META.is_dir():
        pytest.skip(f"the real class list is not at {META} (only in the dev checkout)")
    rows = list(csv.DictReader(open(META / "classes.csv")))
    assert [(r["wnid"], r["words"]) for r in rows] == list(zip(wnids, words))


def test_class_names_are_checked_against_ilsvrc2012s_order():
    _, words = ilsvrc2012()
    assert names_are_ilsvrc2012(list(words), "x")
    renamed = list(words)
    renamed[517] = "crane2"  # the datasets library needs unique names; the devkit has "crane" twice
    assert names_are_ilsvrc2012(renamed, "x")
    assert not names_are_ilsvrc2012([f"class {i}" for i in range(1000)], "x")  # another data set's
    assert not names_are_ilsvrc2012(list(words[:10]), "x")
    swapped = list(words)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(PrepareError, match="x: its labels follow another order .* label 0 is named 'goldfish"):
        names_are_ilsvrc2012(swapped, "x")
    with pytest.raises(PrepareError, match="20 of its 1000 class names differ"):
        names_are_ilsvrc2012([f"{w}!" if i < 20 else w for i, w in enumerate(words)], "x")


@pytest.mark.parametrize("layout", ["folders", "hf_tar", "wds"])
def test_real_wnids_get_all_1000_classes_and_their_names(images, tmp_path, layout):
    """A source whose labels are WNIDs gets ILSVRC-2012's 1000 classes, so a class without images keeps its index
    (here two real classes stand for the demo's four)."""
    wnids, words = ilsvrc2012()
    real_wnid = {wnid: wnids[0 if i < 2 else 999] for i, wnid in enumerate(images["wnids"])}
    real = {"wnids": list(wnids), "words": list(words),
            "train": [(real_wnid[w], f"{real_wnid[w]}_{k}.JPEG", d) for k, (w, _, d) in enumerate(images["train"])],
            "val": [(n, wnids.index(real_wnid[images["wnids"][label]]), d) for n, label, d in images["val"]]}
    work = plan(WRITERS[layout](real, tmp_path / layout))
    assert work["classes"] == list(wnids) and work["class_names"] == list(words)
    assert {s.label for info in work["splits"].values() for s in info["sources"]} == {0, 999}


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any work


def remove(raw: Path, *names: str) -> Path:
    for name in names:
        path = raw / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return raw


@pytest.mark.parametrize("layout, damage, message", [
    ("hf_tar", lambda raw: remove(raw, "data/train_images_3.tar.gz"),
     r"data: 1 of its 5 shards are missing \(train_images_3.tar.gz\)"),
    pytest.param("hf_parquet", lambda raw: remove(raw, "data/train-00001-of-00002.parquet"),
                 r"train-\*.parquet: 1 of its 2 shards are missing \(train-00001-of-00002.parquet\)",
                 marks=needs_pyarrow),
    ("wds", lambda raw: remove(raw, "imagenet1k-train-0001.tar"),
     r"1 of the 4 train shards listed in _info.json are missing \(imagenet1k-train-0001.tar\)"),
    ("wds", lambda raw: remove(raw, "_info.json"),
     r"imagenet1k-train-\*.tar \(no _info.json: the dataset card's count\): 1020 of its 1024 shards are missing "
     r"\(imagenet1k-train-0004.tar"),
    ("hf_tar", lambda raw: (raw / "data/val_images.tar.gz").write_bytes((raw / "data/val_images.tar.gz").read_bytes()
                                                                          [:30000]),
     r"val_images.tar.gz is truncated or damaged .*download it again"),
    ("kaggle", lambda raw: remove(raw, "ILSVRC/Data/CLS-LOC/val"),
     r"CLS-LOC/test is the test split, which has no labels"),
    ("kaggle", lambda raw: remove(raw, "LOC_val_solution.csv"), r"CLS-LOC/val has no labels: LOC_val_solution.csv"),
    ("hf_tar", lambda raw: remove(raw, "data/val_images.tar.gz"), r"test_images.tar.gz is the test split"),
    pytest.param("hf_parquet", lambda raw: remove(raw, "data/validation-00000-of-00001.parquet"),
                 r"test-\*.parquet shards have no labels", marks=needs_pyarrow),
    ("wds", lambda raw: [remove(raw, p.name) for p in raw.glob("imagenet1k-train-*")],
     "validation shards' .cls integers can only be checked against the training shards"),
    pytest.param("hf_parquet", lambda raw: (raw / "data/train-00000-of-00002.parquet").write_bytes(
        (raw / "data/train-00000-of-00002.parquet").read_bytes()[:-100]),
                 r"train-00000-of-00002.parquet is truncated or damaged .*download it again", marks=needs_pyarrow),
    ("wds", lambda raw: (raw / "_info.json").write_text("{"), r"_info.json is damaged"),
    ("wds", lambda raw: shutil.copy(raw / "imagenet1k-validation-00.tar", raw / "imagenet1k-validation-01.tar"),
     r"imagenet1k-validation-0[01].tar: val/ILSVRC2012_val_\d+.JPEG is in the input twice"),
])
def test_bad_input_is_one_line_naming_the_file(layouts, tmp_path, layout, damage, message):
    raw = copy(layouts, layout, tmp_path)
    damage(raw)
    with pytest.raises(PrepareError, match=message) as error:
        plan(raw)
    assert "\n" not in str(error.value)


@needs_pyarrow
def test_a_parquet_file_of_another_data_set_is_refused(layouts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = copy(layouts, "hf_parquet", tmp_path)
    path = raw / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), path)
    with pytest.raises(PrepareError, match="validation-00000-of-00001.parquet is not ILSVRC/imagenet-1k's parquet: "
                                           r"it needs an image column .* and has \['img', 'label'\]"):
        plan(raw)
    pq.write_table(parquet_table([(b"x", "0001.png", 0)], ["airplane", "car"]), path)
    with pytest.raises(PrepareError, match="ClassLabel names differ from the other shards'"):
        plan(raw)
    for file in (raw / "data").glob("train-*"):
        pq.write_table(parquet_table([(b"x", "0001.png", 0)], ["airplane", "car"]), file)
    with pytest.raises(PrepareError, match=r"'0001.png' does not end in _<wnid>.JPEG"):
        plan(raw)


def test_two_layouts_in_one_folder_are_refused_unless_one_is_named(layouts, tmp_path):
    raw = copy(layouts, "hf_tar", tmp_path)
    for shard in layouts["wds"].glob("imagenet1k-*"):
        shutil.copy(shard, raw)
    with pytest.raises(PrepareError, match=r"holds more than one layout: hf_tar \(.*train_images_0.tar.gz.*\); wds "
                                           r"\(.*imagenet1k-train-0000.tar.*source=hf_tar\|wds"):
        plan(raw)
    assert plan(raw, source="hf_tar")["source"]["layout"] == "hf_tar"
    with pytest.raises(PrepareError, match="source=kaggle: .* holds none of the files of Kaggle's"):
        plan(raw, source="kaggle")


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(PrepareError, match=r"reading parquet shards needs pyarrow.*pip install -e '.\[parquet\]'"):
        plan(tmp_path)


def test_the_command_passes_source_on(layouts, tmp_path, capsys):
    assert prepare_main([f"raw={layouts['hf_tar']}", f"store={tmp_path / 'o'}", "source=kaggle"]) == 2
    assert "source=kaggle: " in capsys.readouterr().err


def test_source_is_a_layout_name():
    assert composed("prepare_schema", ["raw=r", "store=s", "source=hf_tar"], conf=False).source.name == "hf_tar"
    with pytest.raises(RunError, match="source.*hf_parquet"):
        composed("prepare_schema", ["raw=r", "store=s", "source=imagenet"], conf=False)
