"""The paper's Figure 1 tool (repro/reports/figure1.py, `repro-figure1`): the net, the activation and init switches,
epochs to 25%, the choice of learning rate, the figure and results it writes, resuming, and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repro.cli import figure1_main
from repro.errors import RunError
from repro.measure import HostSyncs
from repro.reports import figure1
from repro.reports.figure1 import (FIGURE_PNG, RESULTS_JSON, choose, epochs_to_threshold, four_layer_net,
                                   input_transform, load_images, summarise)

CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_class_folders(root: Path, per_class: int = 30, size: int = 32) -> Path:
    """Three classes of noisy single-colour images, as JPEGs in <class>/ folders."""
    rng = np.random.default_rng(0)
    for label, colour in enumerate(COLOURS):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("cifar_like") / "train").parent


def quick_args(data: Path, out: Path, **changes) -> list[str]:
    """`repro-figure1`'s arguments for a quick run: two epochs, batch 32, lr 0.01, unless `changes` says."""
    settings = {"data": data, "out": out, "epochs": 2, "batch_size": 32, "lrs": "[0.01]", **changes}
    return [f"{key}={value}" for key, value in settings.items()]


def test_net_shapes_and_parameters():
    net = four_layer_net("relu")
    x = torch.zeros(2, 3, 32, 32)
    sizes = []
    for layer in net:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            sizes.append(tuple(x.shape[1:]))
    assert sizes == [(32, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert x.shape == (2, 10)
    expected = (3 * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 25 * 64 + 64) + (64 * 16 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert four_layer_net("tanh", num_classes=3)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_activation_switch_changes_the_units():
    torch.manual_seed(0)
    relu = four_layer_net("relu", init="default")
    tanh = four_layer_net("tanh", init="default")
    tanh.load_state_dict(relu.state_dict())  # the same weights: only the units differ
    x = torch.randn(4, 3, 32, 32) * 3
    conv1 = relu[0](x)
    assert torch.equal(relu[1](conv1), conv1.clamp(min=0))
    assert torch.allclose(tanh[1](conv1), torch.tanh(conv1))
    assert not any(isinstance(m, nn.Tanh) for m in relu) and not any(isinstance(m, nn.ReLU) for m in tanh)
    assert not torch.allclose(relu(x), tanh(x))


def test_paper_init_and_inputs():
    torch.manual_seed(0)
    paper, default = four_layer_net("relu", init="paper"), four_layer_net("relu", init="default")
    for layer in (paper[0], paper[3], paper[6], paper[10]):
        assert abs(layer.weight.std().item() - 0.01) < 0.001
        assert torch.count_nonzero(layer.bias) == 0
    assert abs(default[0].weight.std().item() - 0.01) > 0.02  # PyTorch's 1/sqrt(fan_in) scale: 0.067 for conv1
    with pytest.raises(RunError, match="init must be one of"):
        four_layer_net("relu", init="xavier")

    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean, scale = input_transform(images, "paper")
    assert torch.allclose(mean, images.float().mean(0)) and scale == 1.0  # raw 0-255 minus the mean image
    mean, scale = input_transform(images, "default")
    assert abs(((images.float() - mean) * scale).std().item() - 1.0) < 1e-4


@pytest.mark.parametrize("errors, expected", [
    ([0.8, 0.5, 0.3, 0.25, 0.2], 4),  # exactly 25% counts as reached
    ([0.8, 0.26, 0.249, 0.3], 3),
    ([0.2, 0.1], 1),
    ([0.9, 0.5, 0.2501], None),
    ([], None),
])
def test_epochs_to_threshold(errors, expected):
    assert epochs_to_threshold(errors) == expected


def test_epochs_to_other_threshold():
    assert epochs_to_threshold([0.5, 0.4, 0.1], threshold=0.45) == 2


def run(activation, lr, errors):
    return {"activation": activation, "lr": lr, "train_error": errors, "final_error": errors[-1],
            "epochs_to_threshold": epochs_to_threshold(errors)}


def test_choose_fastest_then_lowest_final_error():
    runs = {"a": run("relu", 0.001, [0.5, 0.3, 0.2, 0.15]), "b": run("relu", 0.002, [0.5, 0.24, 0.22, 0.2]),
            "c": run("relu", 0.004, [0.4, 0.24, 0.2, 0.1]), "d": run("tanh", 0.001, [0.6, 0.5, 0.4]),
            "e": run("tanh", 0.002, [0.6, 0.5, 0.35])}
    assert choose(runs, "relu")["lr"] == 0.004  # b and c both reach 25% in epoch 2; c ends lower
    assert choose(runs, "tanh")["lr"] == 0.002  # neither reaches it: the lower last error
    assert choose(runs, "sigmoid") is None


def test_ratio_and_its_lower_bound():
    results = {"settings": {"activations": ["relu", "tanh"]},
               "runs": {"r": run("relu", 0.001, [0.5, 0.24]), "t": run("tanh", 0.001, [0.6, 0.5, 0.4, 0.3, 0.2])}}
    summarise(results)
    assert results["ratio"] == 2.5 and results["ratio_more_than"] is None
    assert results["chosen"]["tanh"] == {"lr": 0.001, "epochs_to_threshold": 5, "final_error": 0.2, "epochs_run": 5}
    results["runs"]["t"] = run("tanh", 0.001, [0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3])
    summarise(results)
    assert results["ratio"] is None and results["ratio_more_than"] == 3.5  # 7 epochs without reaching it vs 2


def test_an_epoch_reads_the_device_once_whatever_its_steps(tmp_path):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 3
    syncs = []
    for batch_size in (8, 32):  # 8 steps an epoch, then 2
        settings = {"seed": 0, "init": "paper", "batch_size": batch_size, "momentum": 0.9, "epochs": 1,
                    "extra_epochs": None, "threshold": 0.25}
        with HostSyncs() as recorder:
            record = figure1.train_curve(images, labels, 3, "relu", 0.001, settings, tmp_path / "none.pt", "cpu")
        syncs.append(recorder.count)
        assert len(record["train_error"]) == 1
    assert syncs[0] == syncs[1] <= 3  # counted once per epoch, not per step


def test_tool_writes_figure_and_results(folders, tmp_path, capsys):
    out = tmp_path / "fig"
    assert figure1_main(quick_args(folders, out, seed=3)) == 0
    with Image.open(out / FIGURE_PNG) as image:
        assert image.format == "PNG"
        assert image.size == (600, 450)
        assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    results = json.loads((out / RESULTS_JSON).read_text())
    assert set(results["runs"]) == {"relu lr=0.01", "tanh lr=0.01"}
    for r in results["runs"].values():
        assert len(r["train_error"]) == 2 and all(0 <= e <= 1 for e in r["train_error"])
        assert r["epochs_to_threshold"] == epochs_to_threshold(r["train_error"])
    assert results["settings"]["images"] == 90 and results["settings"]["classes"] == ["class0", "class1", "class2"]
    assert set(results["chosen"]) == {"relu", "tanh"}
    assert not (out / "partial").exists()
    assert "wrote" in capsys.readouterr().out


def test_rerun_trains_only_new_runs(folders, tmp_path, monkeypatch):
    out = tmp_path / "fig"
    assert figure1_main(quick_args(folders, out, activations="[relu]")) == 0
    first = json.loads((out / RESULTS_JSON).read_text())["runs"]["relu lr=0.01"]

    trained = []
    real = figure1.train_curve

    def counting(images, labels, num_classes, activation, lr, *args, **kwargs):
        trained.append((activation, lr))
        return real(images, labels, num_classes, activation, lr, *args, **kwargs)

    monkeypatch.setattr(figure1, "train_curve", counting)
    assert figure1_main(quick_args(folders, out, activations="[relu,tanh]", lrs="[0.01,0.02]")) == 0
    assert trained == [("tanh", 0.01), ("relu", 0.02), ("tanh", 0.02)]
    runs = json.loads((out / RESULTS_JSON).read_text())["runs"]
    assert runs["relu lr=0.01"] == first and len(runs) == 4

    trained.clear()
    assert figure1_main(quick_args(folders, out, activations="[tanh]", lrs="[0.04]")) == 0
    results = json.loads((out / RESULTS_JSON).read_text())
    assert trained == [("tanh", 0.04)] and len(results["runs"]) == 5
    assert results["settings"]["lrs"] == [0.01, 0.02, 0.04]  # the folder's whole search, not only this call's
    assert set(results["chosen"]) == {"relu", "tanh"}


def test_killed_run_resumes_to_the_same_curve(folders, tmp_path, monkeypatch):
    args = {"epochs": 3, "activations": "[tanh]", "extra_epochs": "null"}
    assert figure1_main(quick_args(folders, tmp_path / "whole", **args)) == 0
    whole = json.loads((tmp_path / "whole" / RESULTS_JSON).read_text())["runs"]["tanh lr=0.01"]

    real, saves = figure1.save_checkpoint, []

    def killed_after_two_epochs(path, checkpoint):
        real(path, checkpoint)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(figure1, "save_checkpoint", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        figure1_main(quick_args(folders, tmp_path / "killed", **args))
    assert not (tmp_path / "killed" / RESULTS_JSON).exists()
    monkeypatch.setattr(figure1, "save_checkpoint", real)
    assert figure1_main(quick_args(folders, tmp_path / "killed", **args)) == 0
    resumed = json.loads((tmp_path / "killed" / RESULTS_JSON).read_text())["runs"]["tanh lr=0.01"]
    assert resumed["train_error"] == whole["train_error"] and resumed["train_loss"] == whole["train_loss"]


def test_stops_a_few_epochs_after_reaching_the_threshold(folders, tmp_path):
    # The colours are easy: with the default init and a high lr ReLU gets below 25% at once.
    out = tmp_path / "fig"
    assert figure1_main(quick_args(folders, out, epochs=30, batch_size=16, lrs="[0.02]", activations="[relu]",
                           init="default", extra_epochs=1)) == 0
    r = json.loads((out / RESULTS_JSON).read_text())["runs"]["relu lr=0.02"]
    assert r["epochs_to_threshold"] is not None
    assert len(r["train_error"]) == r["epochs_to_threshold"] + 1 < 30
    assert r["stopped"] == "1 epochs after reaching 25%"


def test_other_settings_in_the_same_folder_are_refused(folders, tmp_path, capsys):
    out = tmp_path / "fig"
    assert figure1_main(quick_args(folders, out, activations="[relu]")) == 0
    capsys.readouterr()
    assert figure1_main(quick_args(folders, out, activations="[relu]", init="default")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "init: paper now default" in err and "Traceback" not in err


def bad_data(tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    if case == "missing":
        return root
    root.mkdir()
    if case == "one class":
        write_class_folders(tmp_path / "three")
        (tmp_path / "three" / "class1").rename(root / "class1")
    elif case == "wrong size":
        write_class_folders(root, per_class=2, size=48)
    elif case == "not an image":
        write_class_folders(root, per_class=2)
        (root / "class0" / "0000.jpg").write_bytes(b"not a jpeg")
    elif case == "empty CIFAR-10 root":
        (root / "cifar-10-batches-py").mkdir()
    return root


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("empty", "no class folders"),
    ("one class", "at least 2"),
    ("wrong size", "0000.jpg is 48x48; CIFAR-10 images are 32x32"),
    ("not an image", "0000.jpg could not be read as an image"),
    ("empty CIFAR-10 root", "CIFAR-10 could not be read"),
])
def test_bad_data_gives_a_clear_error(tmp_path, capsys, case, message):
    data = bad_data(tmp_path, case)
    assert figure1_main(quick_args(data, tmp_path / "out", epochs=1)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fewer_images_than_a_batch(folders, tmp_path, capsys):
    assert figure1_main(quick_args(folders, tmp_path / "out", limit=20, batch_size=128)) == 2
    assert "fewer than one batch of 128" in capsys.readouterr().err


def test_bad_options_name_the_option(folders, tmp_path, capsys):
    for key, value in (("lrs", "[-0.1]"), ("epochs", 0), ("device", "gpu7"), ("activations", "[sigmoid]"),
                       ("extra_epochs", -1), ("epochs", "many"), ("learning_rate", 0.1)):
        assert figure1_main(quick_args(folders, tmp_path / "out", **{key: value})) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err
    assert figure1_main([f"out={tmp_path / 'out'}"]) == 2 and "give data=..." in capsys.readouterr().err


def test_real_cifar10_mini():
    if not CIFAR_MINI.is_dir():
        pytest.skip(f"{CIFAR_MINI} is absent (the shared test data is not part of a clone)")
    images, labels, classes = load_images(CIFAR_MINI, limit=300, seed=1)
    assert images.dtype == torch.uint8 and images.shape == (300, 3, 32, 32)
    assert classes[:2] == ["airplane", "automobile"] and len(classes) == 10
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    again, _, _ = load_images(CIFAR_MINI, limit=300, seed=1)
    assert torch.equal(images, again)
    assert 80 < images.float().mean() < 160  # real photographs, not blank files
