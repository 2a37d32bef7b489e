"""The paper's Figures 3 and 4 (§6.1) from a trained run, and `repro-figures`.

- Figure 3: the conv1 kernels, tower 0's 48 above tower 1's, each contrast-stretched on its own, plus one number
  per tower saying how colour-specific its kernels are (`repro.kernels.colour_specificity`), so that the paper's
  observation (one GPU's kernels largely colour-agnostic, the other's colour-specific) can be checked across runs.
- Figure 4 left: validation images with the network's five most probable classes as bars (the true class red).
- Figure 4 right: validation images, each with the six training images whose fc7 features (the last hidden
  layer, 4096-d) are nearest in Euclidean distance, found by streaming the whole training split through the
  network on its device.

Everything goes into `<run>/figures/` (PNG and JSON) and, as images and scalars, into the run's TensorBoard.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from repro.data import CROP, Augment, batches
from repro.errors import RunError
from repro.evaluate import load_trained
from repro.io import atomic_write, write_json
from repro.kernels import conv1_colour, conv1_grids
from repro.model import AlexNet, exchange
from repro.progress import progress
from repro.store import Split

FIGURES = ("conv1", "neighbours", "top5")
PAPER_QUERIES = {"top5": 8, "neighbours": 5}  # Fig. 4: 8 images with their labels, 5 with their neighbours
NEIGHBOURS = 6  # Fig. 4 right: six training images per query
TOP = 5
KERNELS_PER_ROW = 16  # Fig. 3 shows each tower's 48 kernels as 3 rows of 16
KERNEL_ZOOM = 5  # each 11x11 kernel drawn as 55x55 pixels
KERNEL_PAD = 2
TOWER_GAP = 8  # grey pixels between the towers' blocks
DPI = 100
CELL = 2.0  # inches per image in the Figure 4 grids (200 pixels at DPI)


# ----------------------------------------------------------------------------------------------------------------
# Figure 3: conv1


def conv1_figure(model: AlexNet) -> Image.Image:
    """Figure 3: rows of 16 kernels, 55x55 pixels each; tower 0 (the paper's GPU 1) on top, then tower 1."""
    blocks = conv1_grids(model, KERNELS_PER_ROW, KERNEL_ZOOM, KERNEL_PAD)
    gap = torch.full((3, TOWER_GAP, blocks[0].shape[2]), 0.5)
    pieces = [blocks[0]] + [part for block in blocks[1:] for part in (gap, block)]
    pixels = (torch.cat(pieces, dim=1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------------------------
# fc7 features and nearest neighbours


@torch.no_grad()
def logits_and_fc7(model: AlexNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass's logits and fc7 features [B, 4096] on `devices[0]`: the last hidden layer (§6.1) after its
    ReLU, before dropout's test-time scaling, both towers' halves side by side (tower 0 first). Hooks on each
    tower's dropout7 read its input, so the model's own forward pass runs unchanged."""
    captured = []
    hooks = [tower.dropout7.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
             for tower in model.towers]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, exchange(captured, model.devices[:1])[0]


def fc7_batches(model: AlexNet, augment: Augment, split: Split, batch_size: int, workers: int = 0,
                start_step: int = 0, desc: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, fc7) of the centre crops (§4.1) of `split`'s usable rows, in row order, batch by batch from batch
    `start_step`, the model in eval mode, with a progress bar when `desc` is given."""
    model.eval()
    loader = batches(split, batch_size, shuffle=False, drop_last=False, workers=workers, start_step=start_step)
    for images, _ in progress(loader, desc, -(-len(split) // batch_size), "batch", initial=start_step):
        yield logits_and_fc7(model, augment.test_views(images, ten_crop=False))


class NearestSearch:
    """The `k` gallery vectors nearest (Euclidean) to each query, kept up to date as the gallery streams past in
    batches: each batch costs one distance matrix (`torch.cdist`, matrix products on the queries' device) and one
    `topk` over the running best and the batch."""

    def __init__(self, queries: torch.Tensor, k: int):
        self.queries, self.k, self.seen = queries, k, 0
        self.distances = queries.new_empty(len(queries), 0)
        self.indices = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)

    def update(self, gallery: torch.Tensor) -> None:
        gallery = gallery.to(self.queries.device, self.queries.dtype)
        distances = torch.cat([self.distances, torch.cdist(self.queries, gallery)], dim=1)
        positions = torch.arange(self.seen, self.seen + len(gallery), device=self.queries.device)
        indices = torch.cat([self.indices, positions.expand(len(self.queries), -1)], dim=1)
        self.distances, best = distances.topk(min(self.k, distances.shape[1]), dim=1, largest=False)
        self.indices = indices.gather(1, best)
        self.seen += len(gallery)

    def state_dict(self) -> dict:
        return {"distances": self.distances.cpu(), "indices": self.indices.cpu(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        device = self.queries.device
        self.distances, self.indices = state["distances"].to(device), state["indices"].to(device)
        self.seen = state["seen"]


def search_training_store(model: AlexNet, augment: Augment, split: Split, queries: torch.Tensor, batch_size: int,
                          workers: int = 0, state_path: Path | None = None, key: dict | None = None,
                          save_every: float = 60.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and positions (in `split.rows`) of the NEIGHBOURS training images nearest to each query's fc7
    features, streaming the whole split through the network. On ImageNet this is an epoch of inference, so with
    `state_path` the running result is saved every `save_every` seconds, and a rerun with the same `key` (which
    must name the checkpoint and the queries) continues from it; the file is removed at the end."""
    search = NearestSearch(queries, NEIGHBOURS)
    key = {**(key or {}), "batch_size": batch_size, "rows": len(split)}
    start = 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["key"] == key:
            search.load_state_dict(state["search"])
            start = state["step"]
    saved = time.monotonic()
    for step, (_, fc7) in enumerate(fc7_batches(model, augment, split, batch_size, workers, start,
                                                desc="fc7 of the training images"), start + 1):
        search.update(fc7)
        if state_path is not None and time.monotonic() - saved >= save_every:
            state = {"key": key, "step": step, "search": search.state_dict()}
            atomic_write(state_path, lambda f: torch.save(state, f))
            saved = time.monotonic()
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return search.distances.cpu(), search.indices.cpu()


# ----------------------------------------------------------------------------------------------------------------
# Figure 4


def query_positions(split: Split, count: int) -> np.ndarray:
    """`count` positions spread evenly over the split (the first and the last included), so every run of the tool
    shows the same images."""
    if not 1 <= count <= len(split):
        raise RunError(f"queries={count}: the validation split has {len(split)} images; ask for 1 to {len(split)}")
    return np.linspace(0, len(split) - 1, count).round().astype(np.int64)


def short_name(words: str, limit: int = 30) -> str:
    """A class's first synonym ("tench, Tinca tinca" -> "tench"), cut to `limit` characters."""
    name = words.split(",")[0].strip()
    return name if len(name) <= limit else name[:limit - 1] + "…"


def top5_figure(images: np.ndarray, probs: torch.Tensor, labels: Sequence[int], names: Sequence[str]) -> Figure:
    """Figure 4 left: each image over a bar chart of its most probable classes (up to five); the true class is
    the image's title and its bar is red. Four images a row; 260 x 400 pixels per image."""
    count, top = len(images), min(TOP, probs.shape[1])
    columns = min(count, 4)
    rows = -(-count // columns)
    figure = Figure(figsize=(columns * 2.6, rows * 4.0), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 2] * rows)
    for i in range(count):
        row, column = divmod(i, columns)
        picture = figure.add_subplot(grid[2 * row, column])
        picture.imshow(images[i])
        picture.set_axis_off()
        picture.set_title(short_name(names[labels[i]]), fontsize=9)
        values, classes = probs[i].topk(top)
        bars = figure.add_subplot(grid[2 * row + 1, column])
        colours = ["tab:red" if c == labels[i] else "tab:blue" for c in classes.tolist()]
        bars.barh(range(top), values.tolist(), color=colours, alpha=0.45)
        for y, (value, c) in enumerate(zip(values.tolist(), classes.tolist())):
            bars.text(0.01, y, f"{short_name(names[c])}  {value:.2f}", va="center", fontsize=7)
        bars.set_xlim(0, 1)
        bars.set_ylim(top - 0.5, -0.5)  # the most probable class on top
        bars.set_yticks([])
        bars.tick_params(axis="x", labelsize=7)
    return figure


def neighbours_figure(queries: np.ndarray, query_labels: Sequence[int], neighbours: np.ndarray,
                      neighbour_labels: np.ndarray, names: Sequence[str]) -> Figure:
    """Figure 4 right: one row per query, the query first (its class in bold), then its neighbours nearest first,
    each titled with its class (green where it is the query's). 200 x 220 pixels per image."""
    count, k = neighbours.shape[:2]
    figure = Figure(figsize=((1 + k) * CELL, count * (CELL + 0.2)), dpi=DPI, layout="constrained")
    axes = figure.subplots(count, 1 + k, squeeze=False)
    for i in range(count):
        cells = [(queries[i], names[query_labels[i]], "black", "bold")]
        cells += [(neighbours[i, j], names[neighbour_labels[i, j]],
                   "tab:green" if neighbour_labels[i, j] == query_labels[i] else "black", "normal")
                  for j in range(k)]
        for ax, (image, name, colour, weight) in zip(axes[i], cells):
            ax.imshow(image)
            ax.set_title(short_name(name, 24), fontsize=8, color=colour, fontweight=weight)
            ax.set_axis_off()
    return figure


# ----------------------------------------------------------------------------------------------------------------
# The tool


def resolve_target(run_dir: str | None, checkpoint: str | None) -> tuple[Path, Path]:
    """(checkpoint, run folder): `checkpoint` (its run folder when it sits in one's checkpoints/, else its own
    folder), or the run folder's checkpoints/last.pt (the final weights, the ones metrics.json describes)."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise RunError(f"checkpoint={checkpoint} does not exist")
        return path, Path(run_dir) if run_dir else path.parent.parent if path.parent.name == "checkpoints" \
            else path.parent
    if not run_dir:
        raise RunError("give run_dir=<a repro-train run folder, runs/<experiment>/<time>> or checkpoint=<a file>")
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise RunError(f"run_dir={run_dir} has no checkpoints/last.pt: give a repro-train run folder whose run has "
                       "written a checkpoint, or checkpoint=<a checkpoint file>")
    return path, Path(run_dir)


def save_png(path: Path, picture: Figure | Image.Image) -> np.ndarray:
    """Write `picture` to `path` atomically; return its pixels (H, W, 3) for TensorBoard."""
    buffer = io.BytesIO()
    if isinstance(picture, Figure):
        picture.savefig(buffer, format="png", dpi=DPI)
    else:
        picture.save(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return np.asarray(Image.open(buffer).convert("RGB"))


def make_figures(run_dir: str | None = None, checkpoint: str | None = None, which: Sequence[str] = FIGURES,
                 store: str | None = None, devices: Sequence[str] | None = None, queries: int | None = None,
                 batch_size: int = 64, workers: int = 2) -> dict:
    """Write the figures `which` names for a run folder or checkpoint into `<run>/figures/` and its TensorBoard;
    return what was written (paths, colour specificity per tower)."""
    unknown = sorted(set(which) - set(FIGURES))
    if unknown or not which:
        raise RunError(f"which={list(which)}: choose from {list(FIGURES)}")
    if batch_size <= 0:
        raise RunError(f"batch_size={batch_size}: must be positive")
    checkpoint_path, run_dir = resolve_target(run_dir, checkpoint)
    checkpoint, model, store, augment = load_trained(checkpoint_path, store, devices)
    out, step = run_dir / "figures", checkpoint["global_step"]
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint_path), "epoch": checkpoint["epoch"], "step": step, "written": []}
    names = store.class_names
    with SummaryWriter(run_dir / "tb") as writer:
        def publish(name: str, picture) -> None:
            pixels = save_png(out / f"{name}.png", picture)
            writer.add_image(f"figures/{name}", pixels, step, dataformats="HWC")
            result["written"].append(str(out / f"{name}.png"))

        if "conv1" in which:
            colour = conv1_colour(model)
            for tower, value in enumerate(colour):
                writer.add_scalar(f"figures/conv1_colour_specificity_tower{tower}", value, step)
            publish("fig3_conv1", conv1_figure(model))
            result["colour_specificity"] = colour
            write_json(out / "fig3_conv1.json", {
                "checkpoint": str(checkpoint_path), "epoch": checkpoint["epoch"], "step": step,
                "colour_specificity": colour,
                "definition": "per tower, the mean over its conv1 kernels of the fraction of each kernel's energy "
                              "(sum of squared weights) outside its grey part (each pixel's mean over R, G, B): "
                              "0 grey, 1 pure colour, about 0.67 for random weights"})
            result["written"].append(str(out / "fig3_conv1.json"))
        if "top5" in which or "neighbours" in which:
            val = store.split("val")
            for kind in ("top5", "neighbours"):
                if kind not in which:
                    continue
                positions = query_positions(val, PAPER_QUERIES[kind] if queries is None else queries)
                outputs = list(fc7_batches(model, augment, val.take(positions), batch_size))
                logits, fc7 = (torch.cat(parts) for parts in zip(*outputs))
                labels = val.labels[val.rows[positions]].tolist()
                if kind == "top5":
                    probs = logits.float().softmax(dim=1).cpu()
                    publish("fig4_top5", top5_figure(val.centre_crops(positions, CROP), probs, labels, names))
                    continue
                train = store.split("train")
                key = {"checkpoint": str(checkpoint_path.resolve()), "step": step, "store": str(store.root),
                       "queries": positions.tolist()}
                _, found = search_training_store(model, augment, train, fc7, batch_size, workers,
                                                 out / "neighbours_search.pt", key)
                found = found.numpy()
                pictures = train.centre_crops(found.reshape(-1), CROP).reshape(*found.shape, CROP, CROP, 3)
                neighbour_labels = train.labels[train.rows[found]]
                publish("fig4_neighbours", neighbours_figure(val.centre_crops(positions, CROP), labels, pictures,
                                                             neighbour_labels, names))
    return result
