"""Ablation sweeps: the conf/ablation files against the paper's table, real `tiny` sweeps through the entry point
(one with a failing job), and the summary of a sweep with repeats, unfinished and never-started jobs."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from helpers import command, train_config
from repro.cli import ablation_report_main
from repro.config import CONF_DIR
from repro.evaluate import PAPER_METRICS
from repro.io import flatten
from repro.reports.ablation import planned_jobs, summarise
from repro.reports.paper import ABLATIONS


def composed(*overrides) -> dict:
    return flatten(OmegaConf.to_container(train_config("experiment=demo", *overrides), enum_to_str=True))


def test_each_ablation_file_changes_exactly_what_the_paper_table_says():
    names = {p.stem for p in (Path(CONF_DIR) / "ablation").glob("*.yaml")}
    assert names == set(ABLATIONS) | {"baseline"}
    base = composed("ablation=baseline")
    assert base == composed()  # the baseline is the experiment itself
    for name, ablation in ABLATIONS.items():
        variant = composed(f"ablation={name}")
        assert {k: v for k, v in variant.items() if base[k] != v} == ablation["changes"], name


def sweep(*args, sweep_dir):
    return subprocess.run(command("repro-train", "--multirun", "experiment=tiny", f"hydra.sweep.dir={sweep_dir}",
                                  *args), capture_output=True, text=True, timeout=900)


def test_tiny_sweep_of_two_variants_end_to_end(demo_store, tmp_path):
    result = sweep(f"data.store={demo_store}", "ablation=baseline,no_lrn", sweep_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ablation=baseline", "ablation=no_lrn"]
    assert ablation_report_main([f"sweep={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    base, no_lrn = summary["variants"]
    assert base["is_baseline"] and base["variant"] == "ablation=baseline" and base["changes"] == {}
    assert no_lrn["ablation"] == "no_lrn" and no_lrn["changes"] == {"model.lrn": False}
    assert no_lrn["paper"]["top1"] == 1.4 and no_lrn["paper"]["top5"] == 1.2
    measured = {v: json.loads((tmp_path / f"ablation={v}" / "metrics.json").read_text())
                for v in ("baseline", "no_lrn")}
    for key in PAPER_METRICS:
        assert base["metrics"][key] == measured["baseline"][key]
        assert no_lrn["delta"][key] == pytest.approx(measured["no_lrn"][key] - measured["baseline"][key])
    assert [j["status"] for j in summary["jobs"]] == ["done", "done"]
    text = (tmp_path / "summary.md").read_text()
    assert "`ablation=no_lrn` | `model.lrn=false`" in text and "+1.4 / +1.2" in text
    assert "Not comparable with the paper's numbers" in text  # demo data, not ILSVRC-2012
    with Image.open(tmp_path / "summary.png") as chart:
        lo, hi = chart.convert("L").getextrema()
        assert chart.size == (800, 230) and hi - lo > 100


def test_a_failed_job_is_reported_and_does_not_stop_the_sweep(demo_store, tmp_path):
    # The first job cannot start (batch larger than the 16 training images); the second must still run.
    result = sweep(f"data.store={demo_store}", "data.batch_size=1000,4", sweep_dir=tmp_path)
    assert result.returncode != 0
    assert "data.batch_size=1000 is larger than the 16 training images" in result.stderr
    summary = summarise(tmp_path)
    failed, done = summary["jobs"]
    assert failed["status"] == "failed" and "larger than the 16 training images" in failed["detail"]
    assert done["status"] == "done" and done["metrics"]["top1_err_10crop"] is not None
    assert summary["baseline"] == "data.batch_size=1000"
    base, variant = summary["variants"]
    assert base["status"]["failed"] == 1 and base["metrics"]["top1_err_1crop"] is None
    assert variant["delta"]["top1_err_1crop"] is None  # nothing to compare with
    assert "| `data.batch_size=1000` | failed | data.batch_size=1000 is larger" in (tmp_path / "summary.md").read_text()


def fake_job(sweep_dir, overrides, config, metrics=None, log=None):
    folder = sweep_dir / ",".join(o for o in overrides if not o.startswith("experiment="))
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps({**metrics, "dataset": "ILSVRC-2012", "val_complete": True}))
    if log:
        (folder / "train.log").write_text(log)


def test_summary_averages_seeds_and_lists_unfinished_and_unstarted_jobs(tmp_path):
    task = ["experiment=paper", "model.overlap_pool=true,false", "seed=0,1"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))

    def config(pool, seed):
        return {"model": {"overlap_pool": pool, "lrn": None}, "seed": seed, "run_dir": None}

    def errors(top1):
        return dict(top1_err_1crop=top1 + 2, top5_err_1crop=20.0, top1_err_10crop=top1, top5_err_10crop=18.0)

    jobs = planned_jobs(tmp_path)  # as Hydra hands them to the jobs: model.overlap_pool=True, ...
    assert len(jobs) == 4 and jobs[0] == ["experiment=paper", "model.overlap_pool=True", "seed=0"]
    fake_job(tmp_path, jobs[0], config(True, 0), errors(40.0))
    fake_job(tmp_path, jobs[1], config(True, 1), errors(41.0))
    fake_job(tmp_path, jobs[2], config(False, 0), errors(41.5))
    # the variant's seed-1 job has no folder: the sweep stopped before it
    summary = summarise(tmp_path)
    base, pool = summary["variants"]
    assert base["variant"] == "model.overlap_pool=True" and base["seeds"] == ["0", "1"]
    assert base["metrics"]["top1_err_10crop"] == pytest.approx(40.5) and base["std"]["top1_err_10crop"] > 0
    assert pool["ablation"] == "no_overlap_pool"  # recognised by what it changes, without the ablation group
    assert pool["delta"]["top1_err_10crop"] == pytest.approx(1.0) and pool["status"]["not started"] == 1
    assert [j["status"] for j in summary["jobs"]] == ["done", "done", "done", "not started"]

    fake_job(tmp_path, jobs[3], config(False, 1), log="epoch 3 step 120/10009 loss 6.2\n")
    summary = summarise(tmp_path)
    assert summary["jobs"][3]["status"] == "unfinished" and "epoch 3 step 120" in summary["jobs"][3]["detail"]
    assert summary["variants"][1]["metrics"]["top1_err_10crop"] == pytest.approx(41.5)  # the done seed only
    text = (tmp_path / "summary.md").read_text()
    assert "40.50 ± 0.71" in text and "1 done, 1 unfinished" in text and "Not comparable" not in text


def test_report_command_explains_a_wrong_folder(tmp_path, capsys):
    assert ablation_report_main([f"sweep={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ablation_report_main([f"sweep={tmp_path}"]) == 2
    assert "multirun" in capsys.readouterr().err
    assert ablation_report_main([]) == 2
    assert "give sweep=..." in capsys.readouterr().err
