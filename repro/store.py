"""The prepared store, read side: what `repro.prepare` writes and everything reads.

A store is a folder: `<split>/images.npy` (N x 256 x 256 x 3 uint8, memory-mapped), `<split>/labels.npy`
(sorted-WNID indices, 0 = n01440764), `<split>/sources.tsv`, `<split>/crc32.npy`, `stats.npz` (the training
split's mean image and RGB eigen-decomposition) and `manifest.json`, written last: a folder without it is an
unfinished store. A split's usable rows are all its rows but the files the prepare skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from repro.errors import StoreError

FORMAT = "repro-prepared-store/1"
SIZE = 256  # §2: "down-sampled the images to a fixed resolution of 256 x 256"


def usable_rows(split_info: dict) -> np.ndarray:
    """A split's rows minus the files the prepare skipped (its manifest entry says which)."""
    skipped = {s["row"] for s in split_info["skipped"]}
    return np.array([r for r in range(split_info["rows"]) if r not in skipped], dtype=np.int64)


def seeded_subset(count: int, limit: int, seed: int) -> np.ndarray:
    """`limit` distinct positions of 0..count-1, in order, drawn from the seed's own stream for subsets (the same
    subset for a seed whatever else the run draws)."""
    return np.sort(np.random.default_rng([seed, 7]).choice(count, limit, replace=False))


class PreparedStore:
    """A complete store folder: its manifest, splits and statistics."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            hint = ("its preparation did not finish: run the same prepare command again"
                    if any((self.root / s / "progress.npy").exists() for s in ("train", "val"))
                    else "prepare one with `make prepare-imagenet RAW=... STORE=...`")
            raise StoreError(f"{self.root} is not a complete prepared store (no manifest.json); {hint}")
        try:
            self.manifest = json.loads(manifest.read_text())
        except ValueError as error:
            raise StoreError(f"{manifest} is damaged ({error}); prepare the store again") from None
        self.classes: list[str] = self.manifest["classes"]

    @property
    def description(self) -> str:
        """What the store holds, for reports: the demo's made-up WNIDs all start with n9, real ones never do."""
        if all(wnid.startswith("n9") for wnid in self.classes):
            return "the demo data"
        return "ILSVRC-2012" if len(self.classes) == 1000 else f"a {len(self.classes)}-class ImageNet subset"

    @property
    def class_names(self) -> list[str]:
        """Each class's devkit `words` ("tench, Tinca tinca") in label order, or its WNID where the store was
        prepared without a devkit (class folders only)."""
        return self.manifest.get("class_names") or list(self.classes)

    def split(self, name: str) -> "Split":
        if name not in self.manifest["splits"]:
            raise StoreError(f"{self.root} has no {name!r} split (it has {sorted(self.manifest['splits'])})")
        folder = self.root / name
        return Split(folder / "images.npy", np.load(folder / "labels.npy").astype(np.int64),
                     usable_rows(self.manifest["splits"][name]))

    def stats(self) -> dict[str, np.ndarray]:
        """The training set's mean image (256x256x3) and RGB eigenvalues/eigenvectors (0-255 scale)."""
        path = self.root / "stats.npz"
        if not path.is_file():
            raise StoreError(f"{path} is missing: the statistics come from the training split; prepare it too")
        with np.load(path) as stats:
            return {key: stats[key] for key in stats.files}


class Split:
    """Some rows of one split of a store: its usable rows, or a part of them. The methods that restrict a split
    return a new one."""

    def __init__(self, images_path: Path, labels: np.ndarray, rows: np.ndarray):
        self.images_path, self.labels, self.rows = images_path, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions) -> "Split":
        """The rows at `positions` (indices into this split's rows, in that order; repeats allowed)."""
        return Split(self.images_path, self.labels, self.rows[np.asarray(positions, dtype=np.int64)])

    def sample(self, limit: int | None, seed: int) -> "Split":
        """A seeded random `limit` of the rows, in row order (all of them when `limit` is None or larger)."""
        if limit is None or limit >= len(self):
            return self
        return Split(self.images_path, self.labels, np.sort(self.rows[seeded_subset(len(self), limit, seed)]))

    def part(self, index: int, parts: int) -> "Split":
        """Contiguous share `index` of `parts` of the rows (one rank's share of the validation images)."""
        return Split(self.images_path, self.labels, np.array_split(self.rows, parts)[index])

    def centre_crops(self, positions, size: int) -> np.ndarray:
        """The central `size` x `size` crops, uint8 [N, size, size, 3], of the images at `positions`."""
        images, start = np.load(self.images_path, mmap_mode="r"), (SIZE - size) // 2
        return np.stack([images[row, start:start + size, start:start + size] for row in self.rows[positions]])
