"""The summary of an ablation sweep: `summarise(sweep_dir)` reads the job folders of a `repro-train --multirun`
sweep and writes `summary.md`, `summary.json` and `summary.png` into the sweep folder (`repro-ablation-report
sweep=...`, `make ablation-report SWEEP=...`).

Jobs are grouped into variants by their overrides, seeds apart (a variant run with seeds 0,1,2 is one row, its
numbers averaged). The baseline is the `ablation=baseline` variant, or the sweep's first variant when no job uses
the `ablation` group. Each variant is described by what its config changes from the baseline's, and matched with
the paper's stated effect (repro/reports/paper.py, ABLATIONS) by its `ablation` name or by those changes. Every job the
sweep planned appears in the summary: done, failed (with its error), unfinished (killed or still running) or not
started.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from repro.errors import RunError
from repro.evaluate import METRIC_LABELS, PAPER_METRICS
from repro.io import atomic_write, flatten, write_json
from repro.reports.paper import ABLATIONS, COMPARABLE, cell

# Settings that say where or how verbosely a job ran, not what it computed: never reported as a variant's change.
NOT_A_CHANGE = ("run_dir", "name", "devices", "seed", "data.store", "data.workers", "log_every", "checkpoint_every",
                "require_two_gpus")


def planned_jobs(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, in launch order, expanded from the sweep's command line (multirun.yaml) as Hydra's
    basic sweeper does; empty when the sweep folder has no multirun.yaml."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return []
    task = yaml.safe_load(multirun.read_text())["hydra"]["overrides"]["task"]
    overrides = OverridesParser.create().parse_overrides([o for o in task if not o.startswith("hydra.")])
    return BasicSweeper.split_arguments(overrides, None)[0]


def read_job(folder: Path) -> dict:
    """A job folder's overrides, config, status and, when it finished, its metrics."""
    overrides = [o for o in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
                 if not o.startswith("hydra.")]
    config_file = folder / ".hydra" / "config.yaml"
    job = {"folder": folder, "overrides": overrides,
           "config": flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {},
           "status": "unfinished", "detail": "", "metrics": None}
    if (folder / "metrics.json").is_file():
        job["status"], job["metrics"] = "done", json.loads((folder / "metrics.json").read_text())
    elif (folder / "failed.json").is_file():
        job["status"], job["detail"] = "failed", json.loads((folder / "failed.json").read_text())["error"]
    else:
        log = folder / "train.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        job["detail"] = ("killed or still running; last log line: " + lines[-1][-200:]) if lines else \
            "killed or still running; no log yet"
    return job


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """The planned jobs matched with the job folders found, in launch order; folders the plan does not list
    (e.g. from an earlier command into the same sweep folder) come last."""
    found = {tuple(sorted(job["overrides"])): job
             for job in (read_job(p.parent.parent) for p in sorted(sweep_dir.rglob(".hydra/overrides.yaml"))
                         if p.parent.parent != sweep_dir)}
    jobs = []
    for overrides in planned_jobs(sweep_dir):
        job = found.pop(tuple(sorted(overrides)), None)
        jobs.append(job or {"folder": None, "overrides": overrides, "config": {}, "status": "not started",
                            "detail": "no job folder yet: waiting in a queue (LAUNCHER=slurm), or the sweep stopped "
                                      "before this job", "metrics": None})
    return jobs + list(found.values())


def variant_label(overrides: list[str], swept: set[str]) -> str:
    """The overrides that tell this variant from the sweep's others (not the seed)."""
    return ",".join(o for o in overrides if o.split("=", 1)[0] in swept and not o.startswith("seed=")) or "(all)"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summarise(sweep_dir: Path | str) -> dict:
    """Read the sweep, write summary.md / summary.json / summary.png into it, and return the summary."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RunError(f"sweep folder {sweep_dir} does not exist")
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise RunError(f"{sweep_dir} holds no multirun.yaml and no job folders: is it a `repro-train --multirun` "
                       "sweep folder (multirun/<name>/<time>)?")
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job["overrides"]:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    swept = {key for key, seen in values.items() if len(seen) > 1}

    groups: dict[str, dict] = {}
    for job in jobs:
        label = variant_label(job["overrides"], swept)
        job["variant"] = label
        groups.setdefault(label, {"variant": label, "jobs": []})["jobs"].append(job)
    baseline = next((g for g in groups.values() if "ablation=baseline" in g["variant"].split(",")),
                    next(iter(groups.values())))
    base_config = next((j["config"] for j in baseline["jobs"] if j["config"]), {})

    for group in groups.values():
        done = [j["metrics"] for j in group["jobs"] if j["status"] == "done"]
        group["seeds"] = sorted({str(j["config"].get("seed", "?")) for j in group["jobs"]})
        group["status"] = {s: sum(j["status"] == s for j in group["jobs"])
                           for s in ("done", "failed", "unfinished", "not started")}
        stats = {k: mean_std([m[k] for m in done]) for k in PAPER_METRICS}
        group["metrics"] = {k: mean for k, (mean, _) in stats.items()}
        group["std"] = {k: std for k, (_, std) in stats.items()}
        config = next((j["config"] for j in group["jobs"] if j["config"]), {})
        group["changes"] = {k: config.get(k) for k in sorted(set(config) | set(base_config))
                            if not k.startswith(NOT_A_CHANGE) and config.get(k) != base_config.get(k)} \
            if config and base_config else {}
        name = next((o.split("=", 1)[1] for o in group["variant"].split(",") if o.startswith("ablation=")), None)
        if name not in ABLATIONS:
            name = next((n for n, a in ABLATIONS.items() if a["changes"] == group["changes"]), None)
        group["ablation"] = name
        group["is_baseline"] = group is baseline
        group["delta"] = {k: (group["metrics"][k] - baseline["metrics"][k]
                              if group["metrics"][k] is not None and baseline["metrics"][k] is not None else None)
                          for k in PAPER_METRICS}

    first_done = next((j["metrics"] for j in jobs if j["status"] == "done"), None)
    summary = {
        "sweep": str(sweep_dir),
        "dataset": first_done["dataset"] if first_done else None,
        "val_complete": first_done["val_complete"] if first_done else None,
        "baseline": baseline["variant"],
        "jobs": [{"folder": str(j["folder"]) if j["folder"] else None, "variant": j["variant"],
                  "overrides": j["overrides"], "status": j["status"], "detail": j["detail"],
                  "metrics": {k: j["metrics"][k] for k in PAPER_METRICS} if j["metrics"] else None}
                 for j in jobs],
        "variants": [{key: g[key] for key in ("variant", "ablation", "is_baseline", "changes", "seeds", "status",
                                               "metrics", "std", "delta")}
                     | {"paper": {k: ABLATIONS[g["ablation"]][k] for k in ("title", "top1", "top5", "paper", "note")}
                        if g["ablation"] in ABLATIONS else None}
                     for g in groups.values()],
    }
    write_json(sweep_dir / "summary.json", summary)
    text = render_markdown(summary)
    atomic_write(sweep_dir / "summary.md", lambda f: f.write(text.encode()))
    plot(summary, sweep_dir / "summary.png")
    return summary


def render_markdown(summary: dict) -> str:
    scale = summary["dataset"] or "unknown data (no job finished)"
    lines = [f"# Ablation sweep {summary['sweep']}", "",
             f"Data: {scale}. Error rates in percent; Δ is the variant minus the baseline ({summary['baseline']}); "
             "the paper's Δ is for 10 patches on ILSVRC-2012 validation.", ""]
    if summary["dataset"] != COMPARABLE or not summary["val_complete"]:
        lines += ["**Not comparable with the paper's numbers**: this sweep did not train and evaluate on the whole of "
                  "ILSVRC-2012, so its differences show the mechanics, not the paper's effects.", ""]
    header = (["ablation", "variant", "changes from the baseline", "seeds"] + [METRIC_LABELS[k] for k in PAPER_METRICS]
              + ["Δ centre (top-1 / top-5)", "Δ 10 patches (top-1 / top-5)", "the paper's Δ", "jobs"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in summary["variants"]:
        paper = v["paper"]
        status = ", ".join(f"{n} {s}" for s, n in v["status"].items() if n)
        changes = ", ".join(f"`{k}={json.dumps(val)}`" for k, val in v["changes"].items())
        lines.append("| " + " | ".join([
            "**baseline**" if v["is_baseline"] else (paper["title"] if paper else "–"), f"`{v['variant']}`",
            "–" if v["is_baseline"] else changes or "none", ",".join(v["seeds"]),
            *(cell(v["metrics"][k], v["std"][k]) for k in PAPER_METRICS),
            *("–" if v["is_baseline"] else
              f"{cell(v['delta'][f'top1_err_{s}'], signed=True)} / {cell(v['delta'][f'top5_err_{s}'], signed=True)}"
              for s in ("1crop", "10crop")),
            "–" if v["is_baseline"] or not paper else paper["paper"], status]) + " |")
    lines += ["", "## Jobs", "", "| job | status | detail |", "|---|---|---|"]
    for job in summary["jobs"]:
        folder = Path(job["folder"]).name if job["folder"] else "(no folder)"
        lines.append(f"| `{folder}` | {job['status']} | {job['detail'].replace('|', '/') or '–'} |")
    notes = [v["paper"] for v in summary["variants"] if v["paper"] and not v["is_baseline"]]
    if notes:
        lines += ["", "The paper's numbers:", ""] + [f"- {p['title']}: {p['paper']}; {p['note']}." for p in notes]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Each variant's Δ top-1 and Δ top-5 (10 patches) beside the paper's, as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in summary["variants"] if not v["is_baseline"]]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.1 * max(1, len(variants))), dpi=100)
    bars = (("top1_err_10crop", "top1", "this sweep, top-1", "tab:blue"),
            ("top5_err_10crop", "top5", "this sweep, top-5", "tab:orange"))
    height = 0.2
    for row, v in enumerate(variants):
        y = len(variants) - 1 - row
        for i, (metric, key, label, colour) in enumerate(bars):
            offset = (1.5 - 2 * i) * height
            measured = v["delta"][metric]
            ax.barh(y + offset, measured or 0.0, height, color=colour, label=label if row == 0 else None)
            if measured is None:
                ax.text(0, y + offset, "  no result (" + ", ".join(f"{n} {s}" for s, n in v["status"].items()
                                                                   if n) + ")", va="center", fontsize=8)
            paper = v["paper"][key] if v["paper"] else None
            ax.barh(y + offset - height, paper or 0.0, height, color="none", edgecolor=colour, hatch="//",
                    label=f"the paper, {key[:3]}-{key[3]}" if row == 0 else None)
    ax.set_yticks(range(len(variants)), [(v["paper"]["title"] if v["paper"] else v["variant"])
                                         for v in reversed(variants)], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("error of the variant minus the baseline, points (10 patches)")
    ax.set_title(f"Ablations: {summary['dataset'] or 'no finished job'}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
