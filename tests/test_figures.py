"""The paper's Figures 3 and 4: the colour-specificity number, fc7 features, the neighbour search, and
`repro-figures` on a tiny trained run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import repro.reports.figures as figures
from repro.cli import figures_main as main
from repro.evaluate import load_trained
from repro.kernels import colour_specificity, conv1_colour
from repro.model import AlexNet
from repro.reports.figures import NearestSearch, conv1_figure, logits_and_fc7, search_training_store
from repro.store import PreparedStore


def grey_kernels(count=48, seed=0):
    """Kernels with the same weights in R, G and B."""
    return torch.randn(count, 1, 11, 11, generator=torch.Generator().manual_seed(seed)).expand(-1, 3, -1, -1)


def opponent_kernels(count=48, seed=1):
    """Kernels whose weights sum to zero over R, G and B at every pixel (e.g. red against green)."""
    k = torch.randn(count, 3, 11, 11, generator=torch.Generator().manual_seed(seed))
    return k - k.mean(dim=1, keepdim=True)


def test_colour_specificity_of_hand_made_kernels():
    assert colour_specificity(grey_kernels()) < 1e-12
    assert colour_specificity(opponent_kernels()) == pytest.approx(1.0)
    red_only = torch.zeros(4, 3, 11, 11)
    red_only[:, 0] = torch.randn(4, 11, 11)
    assert colour_specificity(red_only) == pytest.approx(2 / 3)  # (1,0,0) = grey (1/3,1/3,1/3) + colour (2/3,-1/3,-1/3)
    random = torch.randn(480, 3, 11, 11, generator=torch.Generator().manual_seed(2))
    assert colour_specificity(random) == pytest.approx(2 / 3, abs=0.01)
    # scale-free, and a dead (all-zero) kernel does not turn the mean into NaN
    assert colour_specificity(5 * random) == pytest.approx(colour_specificity(random))
    assert np.isfinite(colour_specificity(torch.cat([random, torch.zeros(1, 3, 11, 11)])))
    # edges in grey with a little colour rank below colour blobs with a little grey
    greyish = grey_kernels() + 0.2 * opponent_kernels()
    colourful = opponent_kernels(seed=3) + 0.2 * grey_kernels(seed=4)
    assert colour_specificity(greyish) < 0.1 < 0.9 < colour_specificity(colourful)


@pytest.fixture(scope="module")
def grey_and_colour_net():
    """A two-tower net (4 classes) whose tower 0 has grey conv1 kernels and tower 1 colour-opponent ones."""
    model = AlexNet(num_classes=4)
    with torch.no_grad():
        model.towers[0].conv1.weight.copy_(grey_kernels())
        model.towers[1].conv1.weight.copy_(opponent_kernels())
    return model


def test_figure_3_puts_tower_0_above_tower_1_and_scores_each(grey_and_colour_net):
    model = grey_and_colour_net
    colour = conv1_colour(model)
    assert len(colour) == 2 and colour[0] < 1e-12 and colour[1] == pytest.approx(1.0)
    picture = np.asarray(conv1_figure(model)).astype(int)
    # 16 kernels a row of 55 px + 2 px padding; 3 rows per tower; an 8 px band between the towers
    assert picture.shape == (2 * 173 + 8, 914, 3)
    top, band, bottom = picture[:173], picture[173:181], picture[181:]
    assert np.abs(top[..., 0] - top[..., 1]).max() == 0 and np.abs(top[..., 1] - top[..., 2]).max() == 0
    assert np.abs(bottom[..., 0] - bottom[..., 1]).mean() > 20
    assert (band == 128).all()
    # each kernel is stretched on its own to the full range
    first = top[2:57, 2:57, 0]
    assert first.min() == 0 and first.max() == 255


def test_one_tower_net_has_one_block_and_one_number():
    model = AlexNet(num_classes=4, towers=1)
    assert len(conv1_colour(model)) == 1
    assert conv1_figure(model).size == (914, 173)


def test_nearest_search_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(5, 64, generator=generator), torch.randn(103, 64, generator=generator)
    search = NearestSearch(queries, 6)
    for start in range(0, len(gallery), 10):  # uneven last batch, and batches larger than k
        search.update(gallery[start:start + 10])
    brute = ((queries[:, None] - gallery[None]) ** 2).sum(-1).sqrt()
    expected = brute.argsort(dim=1)[:, :6]
    assert torch.equal(search.indices, expected)
    torch.testing.assert_close(search.distances, brute.gather(1, expected), rtol=1e-4, atol=1e-4)
    small = NearestSearch(queries, 6)  # fewer gallery vectors than k so far
    small.update(gallery[:4])
    assert torch.equal(small.indices, brute[:, :4].argsort(dim=1))


@pytest.fixture(scope="module")
def trained(tiny_run):
    run_dir, _ = tiny_run
    return load_trained(run_dir / "checkpoints" / "last.pt", devices=["cpu", "cpu"])


def test_fc7_is_the_last_hidden_layer(trained, demo_store):
    _, model, _, augment = trained
    model.eval()
    images = torch.from_numpy(np.load(demo_store / "val" / "images.npy")[:3])
    logits, fc7 = logits_and_fc7(model, augment.test_views(images, ten_crop=False))
    assert fc7.shape == (3, model.fc8.in_features) and (fc7 >= 0).all() and (fc7 > 0).any()  # after the ReLU
    # fc8 reads fc7 through the paper's dropout, x0.5 at test: the features are fc8's input
    torch.testing.assert_close(model.fc8(0.5 * fc7), logits)
    assert all(not tower.dropout7._forward_hooks for tower in model.towers)  # the hooks are gone


def test_neighbour_search_resumes_where_it_was_stopped(trained, monkeypatch, tmp_path):
    _, model, store, augment = trained
    train = store.split("train").take(np.arange(24))  # three batches of 8
    queries = torch.randn(2, model.fc8.in_features, generator=torch.Generator().manual_seed(0)).relu()
    reference = search_training_store(model, augment, train, queries, batch_size=8)

    real_batches, starts = figures.batches, []

    def stopped_after_two(*args, **kwargs):
        for n, batch in enumerate(real_batches(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch

    state = tmp_path / "state.pt"
    monkeypatch.setattr(figures, "batches", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        search_training_store(model, augment, train, queries, 8, state_path=state, key={"run": 1}, save_every=0)
    assert state.is_file()

    def recording(*args, **kwargs):
        starts.append(kwargs["start_step"])
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(figures, "batches", recording)
    resumed = search_training_store(model, augment, train, queries, 8, state_path=state, key={"run": 1})
    assert starts == [2] and not state.exists()
    assert torch.equal(resumed[1], reference[1]) and torch.allclose(resumed[0], reference[0])
    assert reference[1].shape == (2, 6) and len(set(reference[1][0].tolist())) == 6


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A run folder of its own whose checkpoint is the tiny run's (linked: it is 455 MB)."""
    run_dir, _ = tiny_run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").symlink_to(run_dir / "checkpoints" / "last.pt")
    return tmp_path / "run"


def not_blank(path):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return pixels.std() > 10


def test_figures_tool_writes_every_figure(run_copy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main([f"run_dir={run_copy}", "devices=[cpu,cpu]", "workers=0", "batch_size=16"]) == 0
    out = run_copy / "figures"
    expected = {"fig3_conv1.png": (6 * 57 + 2, 2 * 59 + 8),  # experiment=tiny: 6 kernels a tower, one row each
                "fig4_top5.png": (4 * 260, 2 * 400),  # the paper's 8 images, 4 a row
                "fig4_neighbours.png": (7 * 200, 5 * 220)}  # the paper's 5 queries, each + 6 neighbours
    for name, size in expected.items():
        assert Image.open(out / name).size == size, name
        assert not_blank(out / name), name
    numbers = json.loads((out / "fig3_conv1.json").read_text())
    assert len(numbers["colour_specificity"]) == 2 and all(0 < v < 1 for v in numbers["colour_specificity"])
    assert not (out / "neighbours_search.pt").exists()
    events = EventAccumulator(str(run_copy / "tb")).Reload()
    assert {"figures/fig3_conv1", "figures/fig4_top5", "figures/fig4_neighbours"} <= set(events.Tags()["images"])
    assert {"figures/conv1_colour_specificity_tower0", "figures/conv1_colour_specificity_tower1"} <= set(
        events.Tags()["scalars"])


def test_figures_tool_takes_a_checkpoint_and_a_choice(run_copy):
    assert main([f"checkpoint={run_copy / 'checkpoints' / 'last.pt'}", "which=[top5]", "queries=3",
                 "devices=[cpu,cpu]", "workers=0"]) == 0
    assert sorted(p.name for p in (run_copy / "figures").iterdir()) == ["fig4_top5.png"]
    assert Image.open(run_copy / "figures" / "fig4_top5.png").size == (3 * 260, 400)


@pytest.mark.parametrize("args, message", [
    (["checkpoint={tmp}/nowhere.pt"], "checkpoint="),
    (["run_dir={tmp}"], "has no checkpoints/last.pt"),
    ([], "give run_dir="),
    (["run_dir={run}", "which=[conv1,fig5]"], "which="),
    (["run_dir={run}", "which=[top5]", "queries=17"], "queries=17"),
    (["run_dir={run}", "devices=[cuda:5,cuda:5]"], "cuda:5"),
    (["run_dir={run}", "batch_size=ten"], "batch_size"),
])
def test_figures_tool_explains_bad_input(args, message, run_copy, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path / "empty", run=run_copy) for a in args]
    (tmp_path / "empty").mkdir()
    assert main(argv + ["workers=0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_class_names_are_the_devkits_words_or_else_the_wnids(demo_raw, demo_store):
    info = json.loads((demo_raw / "demo_info.json").read_text())
    store = PreparedStore(demo_store)
    assert store.class_names == info["words"]
    store.manifest["class_names"] = None  # a store prepared from class folders, without a devkit
    assert store.class_names == info["wnids"]


def test_figures_read_a_jpeg_store(run_copy, demo_jpeg_store):
    assert main([f"checkpoint={run_copy / 'checkpoints' / 'last.pt'}", f"store={demo_jpeg_store}",
                 "which=[top5]", "queries=2", "devices=[cpu,cpu]", "workers=0"]) == 0
    assert not_blank(run_copy / "figures" / "fig4_top5.png")
