"""The paper's Figure 1 (§3.1): a four-layer convolutional net on CIFAR-10 with ReLUs reaches 25% training error
six times faster than the same net with tanh units, each with its own, independently chosen learning rate and no
regularisation of any kind.

`repro-figure1 data=PATH out=DIR` trains the net once per (activation, learning rate), counts the training
error over each epoch (as the paper's curve does), picks per activation the learning rate that reaches 25% first,
and writes `figure1_relu_tanh.json` (every curve, the choices, epochs to 25%, the ratio, the settings) and
`figure1_relu_tanh.png` into DIR. Each finished run goes into the JSON at once and each epoch of the current run
into `DIR/partial/`, so a killed run loses at most one epoch and a rerun skips what is done.

Whether tanh is slower depends on the setting (see docs/figures.md): `init=paper` (weights N(0, 0.01), biases 0,
raw 0-255 pixels minus the mean image, as in 2012) lets tanh units saturate; `init=default` (PyTorch's
initialisation, inputs scaled to unit variance) does not.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import datasets  # noqa: E402

from repro.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from repro.data import epoch_order  # noqa: E402
from repro.errors import RunError  # noqa: E402
from repro.io import write_json  # noqa: E402
from repro.progress import Progress  # noqa: E402
from repro.runtime import environment  # noqa: E402
from repro.store import seeded_subset  # noqa: E402

log = logging.getLogger("repro")

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
INITS = ("paper", "default")
THRESHOLD = 0.25  # the training error the paper's Figure 1 times
IMAGE_SIZE = 32  # CIFAR-10
FIGURE_INCHES, FIGURE_DPI = (6.0, 4.5), 100  # a 600x450 PNG
RESULTS_JSON, FIGURE_PNG = "figure1_relu_tanh.json", "figure1_relu_tanh.png"
# Settings every curve in one output folder must share (the learning rates and activations may grow on a rerun).
CURVE_SETTINGS = ("data", "limit", "images", "init", "seed", "batch_size", "momentum", "epochs", "extra_epochs")


def four_layer_net(activation: str, num_classes: int = 10, init: str = "paper") -> nn.Sequential:
    """conv5x5-32, maxpool 3/2, conv5x5-32, maxpool, conv5x5-64, maxpool, fc: maps 32, 16, 8, 4 (the pools cover
    the border, as the 2012 code's did). `init="paper"` draws every weight from N(0, 0.01) with zero biases."""
    unit = ACTIVATIONS[activation]
    net = nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), unit(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 32, 5, padding=2), unit(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), unit(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, num_classes))
    if init == "paper":
        for layer in net:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.zeros_(layer.bias)
    elif init != "default":
        raise RunError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    return net


def epochs_to_threshold(errors: list[float], threshold: float = THRESHOLD) -> int | None:
    """The first epoch (1-based) whose training error is at most `threshold`; None if none is."""
    return next((epoch for epoch, error in enumerate(errors, 1) if error <= threshold), None)


def load_images(path: Path, download: bool = False, limit: int | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10's training images as one uint8 (N, 3, 32, 32) tensor, their labels and the class names.

    `path` is a CIFAR-10 root (torchvision's `cifar-10-batches-py`, fetched there with `download`), a class-folder
    root (`<class>/<image>`), or a folder whose `train/` is one (e.g. the JPEG copies of CIFAR-10). `limit` keeps a
    seeded random subset."""
    path = Path(path)
    if download or (path / "cifar-10-batches-py").is_dir():
        try:
            cifar = datasets.CIFAR10(str(path), train=True, download=download)
        except (RuntimeError, OSError) as error:
            raise RunError(f"data={path}: CIFAR-10 could not be read ({error})") from None
        pixels, labels, classes = cifar.data, np.asarray(cifar.targets), list(cifar.classes)
    else:
        pixels, labels, classes = _class_folders(path)
    if limit is not None and limit < len(labels):
        keep = seeded_subset(len(labels), limit, seed)
        pixels, labels = pixels[keep], labels[keep]
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels).long(), classes


def _class_folders(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.is_dir():
        raise RunError(f"data={path} is not a folder: give a CIFAR-10 root (with download=true to fetch it) or a "
                       "folder of class folders such as cifar10/train/<class>/*.jpg")
    root = path / "train" if (path / "train").is_dir() else path
    try:
        folders = datasets.ImageFolder(str(root))
    except (FileNotFoundError, OSError) as error:
        raise RunError(f"data={path}: no class folders with images in {root} ({error}); expected "
                       "<class>/<image> folders, or a CIFAR-10 root with download=true") from None
    if len(folders.classes) < 2:
        raise RunError(f"data={path}: {root} has {len(folders.classes)} class folder(s); training needs at least 2")
    pixels = np.empty((len(folders.samples), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for row, (file, _) in enumerate(folders.samples):
        try:
            with Image.open(file) as image:
                picture = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise RunError(f"{file} could not be read as an image ({error})") from None
        if picture.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise RunError(f"{file} is {picture.shape[1]}x{picture.shape[0]}; CIFAR-10 images are "
                           f"{IMAGE_SIZE}x{IMAGE_SIZE}")
        pixels[row] = picture
    return pixels, np.asarray(folders.targets), list(folders.classes)


def input_transform(images: torch.Tensor, init: str) -> tuple[torch.Tensor, float]:
    """The mean image to subtract and the scale to multiply by: raw 0-255 minus the mean for the paper's setting,
    unit variance for PyTorch's default initialisation (which assumes normalised inputs)."""
    mean = images.float().mean(0)
    scale = 1.0 if init == "paper" else 1.0 / float((images.float() - mean).std())
    return mean, scale


def train_curve(images: torch.Tensor, labels: torch.Tensor, num_classes: int, activation: str, lr: float,
                settings: dict, partial: Path, device: str) -> dict:
    """Train one (activation, lr) from scratch (or from its partial checkpoint) and return its run record: the
    training error counted over each epoch while training, as the paper's curve. The run stops `extra_epochs`
    after reaching the threshold (if set), at `epochs`, or when the loss stops being finite."""
    torch.manual_seed(settings["seed"])  # the same initial weights for every lr of an activation
    net = four_layer_net(activation, num_classes, settings["init"]).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=settings["momentum"])  # no weight decay (§3.1)
    mean, scale = input_transform(images, settings["init"])
    mean = mean.to(device)
    images, labels = images.to(device), labels.to(device)
    record = {"activation": activation, "lr": lr, "train_error": [], "train_loss": [], "seconds": 0.0,
              "stopped": "at the epoch limit"}
    if partial.is_file():
        state = load_checkpoint(partial)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        record = state["record"]
        log.info(f"{activation} lr={lr:g}: resuming after epoch {len(record['train_error'])}")
    batch_size, extra = settings["batch_size"], settings["extra_epochs"]
    while len(record["train_error"]) < settings["epochs"]:
        epoch, start = len(record["train_error"]), time.perf_counter()
        order = torch.from_numpy(epoch_order(len(labels), settings["seed"], epoch, shuffle=True)).to(device)
        # counted on the device and read once per epoch, so the host never waits for a GPU inside an epoch
        wrong, loss_sum = torch.zeros((), device=device), torch.zeros((), dtype=torch.float64, device=device)
        net.train()
        steps = range(0, len(order), batch_size)
        for first in Progress(f"{activation} lr={lr:g} epoch {epoch + 1}", len(steps), "step").iterate(steps):
            rows = order[first:first + batch_size]
            logits = net((images[rows].float() - mean) * scale)
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            wrong += (logits.detach().argmax(1) != labels[rows]).sum()
            loss_sum += loss.detach().double() * len(rows)
        wrong, loss_sum = int(wrong), float(loss_sum)
        if not math.isfinite(loss_sum):  # the epoch is discarded: its weights are not saved
            record["stopped"] = f"diverged in epoch {epoch + 1}"
            log.info(f"{activation} lr={lr:g}: the loss became non-finite in epoch {epoch + 1}; run stopped")
            break
        record["train_error"].append(wrong / len(order))
        record["train_loss"].append(loss_sum / len(order))
        record["seconds"] += time.perf_counter() - start
        log.info(f"{activation} lr={lr:g} epoch {epoch + 1}: training error {record['train_error'][-1]:.4f}, "
            f"loss {record['train_loss'][-1]:.4f} ({time.perf_counter() - start:.1f} s)")
        reached = epochs_to_threshold(record["train_error"], settings["threshold"])
        if extra is not None and reached is not None and len(record["train_error"]) >= reached + extra:
            record["stopped"] = f"{extra} epochs after reaching {settings['threshold']:.0%}"
            break
        if len(record["train_error"]) < settings["epochs"]:
            save_checkpoint(partial, {"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                                      "record": record})
    record["epochs_to_threshold"] = epochs_to_threshold(record["train_error"], settings["threshold"])
    record["final_error"] = record["train_error"][-1] if record["train_error"] else None
    record["seconds"] = round(record["seconds"], 1)
    return record


def run_key(activation: str, lr: float) -> str:
    return f"{activation} lr={lr:g}"


def choose(runs: dict, activation: str) -> dict | None:
    """The activation's fastest run: the fewest epochs to the threshold, ties (and runs that never reach it) by
    the lower training error at their last epoch."""
    candidates = [r for r in runs.values() if r["activation"] == activation and r["final_error"] is not None]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r["epochs_to_threshold"] is None, r["epochs_to_threshold"] or 0,
                                          r["final_error"]))


def summarise(results: dict) -> None:
    """The chosen lr per activation, its epochs to the threshold and the tanh/ReLU ratio, into `results`."""
    chosen = {}
    for activation in results["settings"]["activations"]:
        best = choose(results["runs"], activation)
        if best is not None:
            chosen[activation] = {"lr": best["lr"], "epochs_to_threshold": best["epochs_to_threshold"],
                                  "final_error": best["final_error"], "epochs_run": len(best["train_error"])}
    results["chosen"] = chosen
    relu, tanh = chosen.get("relu"), chosen.get("tanh")
    results["ratio"] = results["ratio_more_than"] = None
    if relu and tanh and relu["epochs_to_threshold"]:
        if tanh["epochs_to_threshold"]:
            results["ratio"] = round(tanh["epochs_to_threshold"] / relu["epochs_to_threshold"], 2)
        else:  # tanh did not get there: the ratio is only bounded below
            results["ratio_more_than"] = round(tanh["epochs_run"] / relu["epochs_to_threshold"], 2)


def plot(results: dict, path: Path) -> None:
    """Training error against epochs like the paper's Figure 1: ReLU solid, tanh dashed, the 25% line; the chosen
    lr of each activation in full colour, the other lrs of the search faint."""
    styles = {"relu": ("-", "tab:blue"), "tanh": ("--", "tab:red")}
    fig, ax = plt.subplots(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    for run in results["runs"].values():
        chosen = results["chosen"].get(run["activation"], {}).get("lr") == run["lr"]
        style, colour = styles.get(run["activation"], (":", "tab:gray"))
        errors = run["train_error"]
        ax.plot(range(1, len(errors) + 1), errors, style, color=colour, alpha=1.0 if chosen else 0.25,
                linewidth=2.0 if chosen else 1.0,
                label=f"{run['activation']}, lr {run['lr']:g}" + (" (chosen)" if chosen else ""))
    threshold = results["settings"]["threshold"]
    ax.axhline(threshold, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Training error rate")
    ax.set_ylim(0, 0.8)
    ax.set_xlim(left=0)
    if results["ratio"] is not None:
        verdict = f"tanh/ReLU epochs to {threshold:.0%}: {results['ratio']:g}x (paper: 6x)"
    elif results["ratio_more_than"] is not None:
        verdict = f"tanh never reached {threshold:.0%}: > {results['ratio_more_than']:g}x slower (paper: 6x)"
    else:
        verdict = f"epochs to {threshold:.0%}: " + ", ".join(
            f"{a} {c['epochs_to_threshold']}" for a, c in results["chosen"].items())
    settings = results["settings"]
    ax.set_title(f"{settings['images']} CIFAR-10 images, init {settings['init']}\n{verdict}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)


def figure1(data: Path, out: Path, activations: list[str], lrs: list[float], epochs: int, extra_epochs: int | None,
            init: str = "paper", seed: int = 0, limit: int | None = None, batch_size: int = 128,
            device: str = "cpu", download: bool = False) -> dict:
    """Every (activation, lr) run not already in `out`'s results, then the choices, the ratio and the figure."""
    unknown = sorted(set(activations) - set(ACTIVATIONS))
    if unknown or not activations or init not in INITS:
        raise RunError(f"activations={activations}, init={init}: choose activations from {sorted(ACTIVATIONS)} "
                       f"and init from {list(INITS)}")
    start = time.perf_counter()
    images, labels, classes = load_images(data, download, limit, seed)
    if len(labels) < batch_size:
        raise RunError(f"data={data} gives {len(labels)} images, fewer than one batch of {batch_size}")
    settings = {"data": str(Path(data).resolve()), "limit": limit, "images": len(labels), "classes": classes,
                "init": init, "seed": seed, "batch_size": batch_size, "momentum": 0.9, "epochs": epochs,
                "extra_epochs": extra_epochs, "threshold": THRESHOLD, "activations": activations, "lrs": lrs,
                "device": device}
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_JSON
    results = {"figure": "Figure 1 (§3.1): ReLU vs tanh, four-layer conv net, CIFAR-10", "settings": settings,
               "environment": environment([device]), "runs": {}, "seconds": 0.0}
    if results_path.is_file():
        previous = load_results(results_path)
        changed = [f"{k}: {previous['settings'].get(k)} now {settings[k]}" for k in CURVE_SETTINGS
                   if previous["settings"].get(k) != settings[k]]
        if changed:
            raise RunError(f"{out} holds runs with other settings ({'; '.join(changed)}); use another out=")
        results["runs"], results["seconds"] = previous["runs"], previous["seconds"]
        # What the folder holds: the searches of earlier calls too.
        settings["activations"] = list(dict.fromkeys(previous["settings"]["activations"] + activations))
        settings["lrs"] = list(dict.fromkeys(previous["settings"]["lrs"] + lrs))
    partial = out / "partial"
    log.info(f"{len(labels)} training images, {len(classes)} classes, init {init}, device {device}")
    for lr in lrs:  # lr-major: a kill leaves pairs of curves to compare
        for activation in activations:
            key = run_key(activation, lr)
            if key in results["runs"]:
                log.info(f"{key}: done before ({RESULTS_JSON}), skipped")
                continue
            partial.mkdir(exist_ok=True)
            checkpoint = partial / f"{activation}-lr{lr:g}.pt"
            run = train_curve(images, labels, len(classes), activation, lr, settings, checkpoint, device)
            results["runs"][key] = run
            results["seconds"] = round(results["seconds"] + run["seconds"], 1)
            summarise(results)
            write_json(results_path, results)  # before the partial goes: a kill between the two loses nothing
            checkpoint.unlink(missing_ok=True)
            log.info(f"{key}: epochs to {THRESHOLD:.0%}: {run['epochs_to_threshold']}, last error "
                f"{run['final_error']}, {run['stopped']}")
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    summarise(results)
    results["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    write_json(results_path, results)
    plot(results, out / FIGURE_PNG)
    return results


def load_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"{path} could not be read ({error}); remove it or use another out=") from None
