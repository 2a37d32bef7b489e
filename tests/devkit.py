"""A devkit folder (data/meta.mat and the validation ground truth) for tests that start from real metadata."""

from pathlib import Path

from repro.demo_data import meta_mat


def write_devkit(folder: Path, id_to_wnid: dict[int, str], ground_truth: list) -> None:
    """`folder`/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}, as in ILSVRC2012_devkit_t12."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    wnids = sorted(id_to_wnid.values())
    internal = ["n99999998", "n99999999"]  # two non-leaf synsets, as the real devkit has
    (folder / "data" / "meta.mat").write_bytes(meta_mat(wnids, {w: i for i, w in id_to_wnid.items()}, internal, 0))
    (folder / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{g}\n" for g in ground_truth))
