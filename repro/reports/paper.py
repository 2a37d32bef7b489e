"""Published ILSVRC-2012 validation error rates (percent) that a run is compared with, where they come from, and a
finished run's `report.md` beside them; the paper's ablation effects, for the sweep summaries.

Each entry: top-1/top-5 with the centre crop ("1crop") and with the paper's 10 patches ("10crop"); None where the
source gives no number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from repro.errors import RunError
from repro.evaluate import METRIC_LABELS
from repro.io import atomic_write

REFERENCES = [
    {"name": "paper, Table 2, 1 CNN", "source": "Krizhevsky et al. 2012, Table 2",
     "top1_err_1crop": None, "top5_err_1crop": None, "top1_err_10crop": 40.7, "top5_err_10crop": 18.2},
    {"name": "2012 code, run #145 (Table 2's run)", "source": "layer-params-145.cfg notes (multiview)",
     "top1_err_1crop": None, "top5_err_1crop": None, "top1_err_10crop": 40.664, "top5_err_10crop": 18.210},
    {"name": "2012 code, run #155", "source": "layer-params notes: centre patch vs multiview",
     "top1_err_1crop": 42.65, "top5_err_1crop": 19.97, "top1_err_10crop": 40.74, "top5_err_10crop": 18.52},
    {"name": "Caffe bvlc_alexnet", "source": "BVLC/caffe models/bvlc_alexnet readme (57.1 / 80.2 accuracy)",
     "top1_err_1crop": 42.9, "top5_err_1crop": 19.8, "top1_err_10crop": None, "top5_err_10crop": None},
    {"name": "torchvision alexnet (a different, later net)", "source": "IMAGENET1K_V1: acc@1 56.522, acc@5 79.066",
     "top1_err_1crop": 43.5, "top5_err_1crop": 20.9, "top1_err_10crop": None, "top5_err_10crop": None},
]

COMPARABLE = "ILSVRC-2012"  # the published rows are on its validation set
VAL_IMAGES = 50_000  # ILSVRC-2012's validation images: every published row is measured on all of them


def standard_error(error: float, images: int) -> float:
    """The binomial standard error, in points, of an error rate `error` (percent) measured on `images` of the
    VAL_IMAGES validation images taken at random, as an estimate of the rate on all of them (with the finite-population
    correction: 0 on all 50,000). The published rates are exact on all of them, so it is also the standard error of
    this run's difference from each."""
    p = error / 100
    return 100 * math.sqrt(p * (1 - p) / images * max(VAL_IMAGES - images, 0) / (VAL_IMAGES - 1))


def cell(value: float | None, std: float | None = None, signed: bool = False) -> str:
    """A table cell for an error rate in percent (or a difference, `signed`), with its uncertainty if given (a std
    over seeds, a standard error)."""
    if value is None:
        return "–"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return f"{text} ± {std:.2f}" if std is not None else text


def comparison_table(metrics: dict, dataset: str) -> str:
    """A Markdown table of this run beside the published numbers; with this run's difference from each only when
    the run is on the same data (ILSVRC-2012), each with its standard error when the run saw a part of the
    validation set (`val_images` of the 50,000)."""
    comparable, images = dataset == COMPARABLE, metrics.get("val_images")
    partial = comparable and images is not None and images < VAL_IMAGES

    def difference(ref):
        return ", ".join(f"{label} {cell(metrics[k] - ref[k], error_bar(k), signed=True)}"
                         for k, label in METRIC_LABELS.items()
                         if ref[k] is not None and metrics.get(k) is not None) or "–"

    def error_bar(key):
        return standard_error(metrics[key], images) if partial else None

    seen = (f", {images:,} of the {VAL_IMAGES:,} validation images" if partial else
            f", all {VAL_IMAGES:,} validation images" if comparable and images == VAL_IMAGES else "")
    header = "| | " + " | ".join(METRIC_LABELS.values()) + (" | this run minus it |" if comparable else " |")
    lines = [header, "|---" * (len(METRIC_LABELS) + 1 + comparable) + "|",
             f"| **this run** ({dataset}{seen}) | " + " | ".join(cell(metrics.get(k)) for k in METRIC_LABELS)
             + (" | |" if comparable else " |")]
    for ref in REFERENCES:
        lines.append(f"| {ref['name']} | " + " | ".join(cell(ref[k]) for k in METRIC_LABELS)
                     + (f" | {difference(ref)} |" if comparable else " |"))
    lines.append("")
    lines.append("Error rates in percent on the ILSVRC-2012 validation set (50,000 images) for the published rows. "
                 + ("" if comparable else f"This run used {dataset}, so its numbers are not comparable with them "
                                          "and no differences are shown."))
    if partial:
        lines[-1] += (f"This run was evaluated on {images:,} of them, so each difference carries its binomial standard "
                      "error (± one, as if those images were drawn at random from the 50,000): a difference within "
                      "two standard errors of zero can be chance.")
    elif comparable and images is None:
        lines[-1] += "The number of validation images this run was evaluated on is not recorded."
    return "\n".join(lines)


def changes_note(metrics: dict) -> str:
    """The settings a resume changed during the run, from which step (metrics.json's `setting_changes`)."""
    return "".join(f"\nFrom global step {change['global_step']} (epoch {change['epoch']} step {change['step']}): "
                   + ", ".join(f"{key} {json.dumps(before)} -> {json.dumps(after)}"
                               for key, (before, after) in change["settings"].items()) + "."
                   for change in metrics.get("setting_changes", []))


def write_report(run_dir: Path) -> str:
    """report.md in the run folder: this run's errors beside the paper's and other published ones."""
    metrics_path = Path(run_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path} does not exist: the run has not finished (resume it to finish it)")
    metrics = json.loads(metrics_path.read_text())
    table = comparison_table(metrics, metrics["dataset"])
    changes = changes_note(metrics)
    text = (f"# {Path(run_dir).name}: {metrics['preset']} preset, epoch {metrics['epoch']}, step {metrics['step']}\n\n"
            f"{table}\n" + (f"\nSettings changed on resume:{changes}\n" if changes else ""))
    atomic_write(Path(run_dir) / "report.md", lambda f: f.write(text.encode()))
    return text


# The paper's ablations (conf/ablation/NAME.yaml): what each changes from the full network, and the effect the paper
# states, as the variant's error minus the full network's, in points (ILSVRC-2012 validation, 10 patches, unless the
# note says otherwise). None where the paper gives no number.
ABLATIONS = {
    "no_lrn": {"title": "response normalisation (§3.3)", "changes": {"model.lrn": False},
               "top1": 1.4, "top5": 1.2, "paper": "+1.4 / +1.2",
               "note": "2012 run #148, every normalisation layer removed: 42.03 / 19.36 vs 40.66 / 18.21"},
    "no_overlap_pool": {"title": "overlapping pooling (§3.4)", "changes": {"model.overlap_pool": False},
                        "top1": 0.4, "top5": 0.3, "paper": "+0.4 / +0.3",
                        "note": "2012 run #147, 2x2/2 pooling: 41.06 / 18.51"},
    "one_tower": {"title": "two towers vs the one-GPU net (§3.2)", "changes": {"model.towers": 1},
                  "top1": 1.7, "top5": 1.2, "paper": "+1.7 / +1.2",
                  "note": "measured on ILSVRC-2010 test: 39.17 / 18.23 vs 37.47 / 17.00"},
    "no_pca": {"title": "PCA colour noise (§4.1)", "changes": {"data.pca_lighting": False},
               "top1": 1.0, "top5": None, "paper": "more than +1 top-1",
               "note": "\"reduces the top-1 error rate by over 1%\": a lower bound"},
    "no_dropout": {"title": "dropout (§4.2)", "changes": {"model.dropout": False},
                   "top1": None, "top5": None, "paper": "no number",
                   "note": "\"Without dropout, our network exhibits substantial overfitting\""},
}
