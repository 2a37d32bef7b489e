"""Every command of the project (the console scripts of setup.cfg), with one convention.

Settings are key=value, typed by the schemas in repro/config.py and parsed by Hydra (so `devices=[cpu,cpu]`,
`model.lrn=false` and `which=[conv1]` read the same everywhere); `COMMAND --help` lists them. The figures and the
preflight import their libraries (matplotlib, torchvision's models) when they run, so that every other command starts
(and answers a wrong setting) without them. A problem the user
can fix (`repro.errors.ReproError`) ends a command with one line on stderr and exit status 2. `repro-train` and
`repro-eval` are Hydra apps (run folders, `--multirun` sweeps, in which a failed job is recorded and the others
go on); the other commands compose their settings with Hydra's compose API and write no Hydra folders. Training
stopped by a signal (`repro.loop.Stopped`, last.pt saved) ends with one logged line and status 128 + the signal's
number, after the launcher's own handler of the signal, if any, has had it (submitit's requeues the job); so do a
final evaluation and a preparation stopped by SIGINT or SIGTERM (what is done is kept; the same command goes on).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

import torch
import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from repro.config import CONF_DIR, TOOL_CONFIGS, composed, validate
from repro.demo_data import make_demo_data
from repro.distributed import World
from repro.errors import ReproError, RunError
from repro.evaluate import evaluate_checkpoint
from repro.io import atomic_write, locked, make_folder
from repro.launchers import own_gpu_pair, share_visible_gpus
from repro.loop import StopSignals, Stopped
from repro.prepare import STOP_SIGNALS, convert, prepare
from repro.progress import setup_logging
from repro.reports.ablation import summarise
from repro.reports.paper import write_report
from repro.runtime import resolve_devices, use_devices, worker_count
from repro.train import train

HYDRA_RECORD = ".hydra"  # a run folder's record of repro-train's command, in Hydra's layout (hydra_record)


def fail(tool: str, error: Exception) -> None:
    """The one line a command prints for the user's problem."""
    print(f"{tool}: error: {error}", file=sys.stderr)


def entry_point(tool: str):
    """A command taking `argv` (default: the command line), with the shared logging and error handling."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            setup_logging()
            try:
                return main(sys.argv[1:] if argv is None else list(argv)) or 0
            except ReproError as error:
                fail(tool, error)
                return 2
            except Stopped as stop:  # its one line is logged
                return stop.hand_over()
        return run
    return decorate


def settings(tool: str, key: str, argv: list[str]) -> DictConfig:
    """The settings of a command from its key=value arguments (`--help` prints them and exits)."""
    schema = TOOL_CONFIGS[key]
    if {"-h", "--help"} & set(argv):
        print(f"usage: {tool} key=value ...\n\n{' '.join(schema.__doc__.split())}\n\nsettings and defaults (??? "
              f"must be given):\n{OmegaConf.to_yaml(OmegaConf.structured(schema))}")
        sys.exit(0)
    cfg = composed(f"{key}_schema", argv, conf=False)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RunError(f"give {' '.join(f'{k}=...' for k in missing)} ({tool} --help lists the settings)")
    validate(cfg)
    return cfg


# -- training and evaluation (Hydra apps) ----------------------------------------------------------------------


def given_run_dir(argv: list[str]) -> Path | None:
    """The run folder a `repro-train` command line names (hydra.run.dir=..., without interpolations), if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if {"-m", "--multirun"} & set(argv):
        return None  # a sweep's jobs have folders of their own, each locked by train()
    given = [a for a in argv if a.lstrip("+~").startswith("hydra.run.dir=")]
    try:
        value = OverridesParser.create().parse_overrides(given[-1:])[0].value() if given else None
    except HydraException:
        return None  # Hydra says what is wrong with it
    return Path(value) if isinstance(value, str) and "${" not in value else None


def train_main() -> None:
    """`repro-train [key=value ...]`, also under torchrun (one process per GPU pair) and as a --multirun sweep."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    world = World.from_env()
    share_visible_gpus()  # for the jobs of LAUNCHER=pairs (repro/launchers.py)
    if not world.main:
        # Only rank 0's Hydra names the run folder (its ${now} name may differ here); train() shares it.
        sys.argv = [a for a in sys.argv if not a.lstrip("+~").startswith("hydra.run.dir=")] + ["hydra.run.dir=."]

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
    def run(cfg: DictConfig) -> float:
        setup_logging()
        record = hydra_record(cfg)
        if cfg.run_dir is None:
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        tool = f"repro-train{f' (rank {world.rank})' if world.launched else ''}"
        try:
            with own_gpu_pair(HydraConfig.get()):
                metrics = train(cfg, on_accept=record)
            if world.main:
                print(write_report(cfg.run_dir))
        except ReproError as error:
            fail(tool, error)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # Hydra marks the job failed and goes on with the sweep's other jobs (an exit would stop them)
            sys.exit(2)
        except Stopped as stop:
            sys.exit(stop.hand_over())  # its one line is logged; in a basic launcher's sweep the sweep stops too
        return metrics["top1_err_10crop"]

    # Make and lock a run folder named on the command line before Hydra starts: a path through a file is named in one
    # line (Hydra's own mkdir would fail with a traceback), a second process is refused at once. train() locks every
    # run folder (this lock is already its own).
    run_dir = given_run_dir(sys.argv[1:]) if world.main else None
    try:
        if run_dir:
            make_folder(run_dir, "hydra.run.dir")
        with locked(run_dir, "training run") if run_dir else contextlib.nullcontext():
            run()
    except ReproError as error:
        fail("repro-train", error)
        sys.exit(2)


def hydra_record(cfg: DictConfig):
    """What Hydra writes into a job's folder as it starts (.hydra/config.yaml, hydra.yaml, overrides.yaml: the run's
    command, which repro-resume and the ablation summaries read), as a function that writes it; train() calls it
    once the run is accepted. conf/train.yaml turns Hydra's own writing off: it came before a resume with other
    settings was refused, so that the refused command replaced the run's and every later resume replayed it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.instance().cfg
    files = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}
    folder = Path(hydra_cfg.hydra.runtime.output_dir) / HYDRA_RECORD

    def write() -> None:
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            atomic_write(folder / name, lambda f, text=text: f.write(text.encode()))
    return write


def eval_main() -> None:
    """`repro-eval checkpoint=... [store=...] [devices=[...]]`: centre crop and 10 patches of a checkpoint."""
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        setup_logging()
        try:
            metrics = evaluate_checkpoint(cfg)
        except ReproError as error:
            fail("repro-eval", error)
            sys.exit(2)
        print(json.dumps({k: v for k, v in metrics.items() if k != "options"}, indent=1))

    run()


def usage(argv: list[str], text: str) -> None:
    """`--help` of a command without settings of its own: print `text` and exit."""
    if {"-h", "--help"} & set(argv):
        print(text)
        sys.exit(0)


@entry_point("repro-resume")
def resume_main(argv: list[str]) -> int:
    """`repro-resume run_dir=RUN [key=value ...]`: continue a run from its last checkpoint, with the run's own
    command-line settings (.hydra/overrides.yaml) and any new ones (e.g. data.workers=8)."""
    usage(argv, f"usage: repro-resume run_dir=RUN [key=value ...]\n\n{' '.join(resume_main.__doc__.split())}\n"
                "The settings are repro-train's (repro-train --help).")
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    if not run_dirs:
        raise RunError("give run_dir=<the run folder to continue> (and any settings to change, key=value)")
    run_dir = Path(run_dirs[-1])
    overrides_file = run_dir / HYDRA_RECORD / "overrides.yaml"
    if not overrides_file.is_file():
        raise RunError(f"{overrides_file} does not exist: {run_dir} is not a repro-train run folder")
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith("hydra.")]
    extra = [a for a in argv if not a.startswith("run_dir=")]
    train(composed("train", [*overrides, *extra, f"run_dir={run_dir.resolve()}"]))
    print(write_report(run_dir))
    return 0


@entry_point("repro-report")
def report_main(argv: list[str]) -> int:
    print(write_report(Path(settings("repro-report", "report", argv).run_dir)))
    return 0


# -- data ------------------------------------------------------------------------------------------------------


def store_work_stops(what: str, store: str) -> StopSignals:
    """Ctrl-C or a scheduler's SIGTERM during a store's `what` (preparation, conversion): one line, no traceback;
    the images done are kept."""
    kept = f"the images converted so far are kept in {store} and the same command continues from them"
    return StopSignals(STOP_SIGNALS, at_once=f"during the {what}; nothing is lost: {kept}")


@entry_point("repro-prepare")
def prepare_main(argv: list[str]) -> int:
    cfg = settings("repro-prepare", "prepare", argv)
    with store_work_stops("preparation", cfg.store):
        prepare(Path(cfg.raw), Path(cfg.store), cfg.skip_bad, cfg.workers, cfg.draft,
                source=cfg.source.name if cfg.source else None, record_format=cfg.format.name, quality=cfg.quality)
    return 0


@entry_point("repro-convert")
def convert_main(argv: list[str]) -> int:
    cfg = settings("repro-convert", "convert", argv)
    with store_work_stops("conversion", cfg.store):
        convert(Path(cfg.source), Path(cfg.store), cfg.format.name, cfg.quality, cfg.workers)
    return 0


@entry_point("repro-demo-data")
def demo_data_main(argv: list[str]) -> int:
    cfg = settings("repro-demo-data", "demo_data", argv)
    info = make_demo_data(cfg.raw, cfg.num_classes, cfg.train_per_class, cfg.val_per_class, cfg.seed)
    print(f"{cfg.raw}: demo ILSVRC-2012 with {cfg.num_classes} classes, {len(info['wnids']) * cfg.train_per_class} "
          f"train and {len(info['val_labels'])} validation images, seed {cfg.seed}")
    return 0


# -- reports ---------------------------------------------------------------------------------------------------


@entry_point("repro-figures")
def figures_main(argv: list[str]) -> int:
    cfg = settings("repro-figures", "figures", argv)
    from repro.reports.figures import make_figures

    result = make_figures(cfg.run_dir, cfg.checkpoint, list(cfg.which), cfg.store, cfg.devices, cfg.queries,
                          cfg.batch_size, worker_count(cfg.workers))
    for path in result["written"]:
        print(path)
    if "colour_specificity" in result:
        print("conv1 colour specificity (0 grey .. 1 pure colour, ~0.67 random): " + ", ".join(
            f"tower {t} {value:.3f}" for t, value in enumerate(result["colour_specificity"])))
    return 0


@entry_point("repro-figure1")
def figure1_main(argv: list[str]) -> int:
    cfg = settings("repro-figure1", "figure1", argv)
    use_devices(resolve_devices([cfg.device, cfg.device], require_two_gpus=False))  # a device that exists here
    from repro.reports.figure1 import FIGURE_PNG, RESULTS_JSON, THRESHOLD, figure1

    results = figure1(Path(cfg.data), Path(cfg.out), list(dict.fromkeys(cfg.activations)),
                      list(dict.fromkeys(cfg.lrs)), cfg.epochs, cfg.extra_epochs, cfg.init, cfg.seed, cfg.limit,
                      cfg.batch_size, cfg.device, cfg.download)
    for activation, chosen in results["chosen"].items():
        print(f"{activation}: lr {chosen['lr']:g}, epochs to {THRESHOLD:.0%}: {chosen['epochs_to_threshold']}, "
              f"last training error {chosen['final_error']:.4f}")
    if results["ratio"] is not None:
        print(f"tanh needs {results['ratio']}x ReLU's epochs to reach {THRESHOLD:.0%}")
    elif results["ratio_more_than"] is not None:
        print(f"tanh needs more than {results['ratio_more_than']}x ReLU's epochs (it did not reach {THRESHOLD:.0%})")
    print(f"wrote {Path(cfg.out) / RESULTS_JSON} and {Path(cfg.out) / FIGURE_PNG}")
    return 0


@entry_point("repro-ablation-report")
def ablation_report_main(argv: list[str]) -> int:
    cfg = settings("repro-ablation-report", "ablation_report", argv)
    summarise(cfg.sweep)
    print((Path(cfg.sweep) / "summary.md").read_text())
    return 0


@entry_point("repro-gpus")
def two_gpus_main(argv: list[str]) -> int:
    """`repro-gpus`: the GPUs here, or exit status 2 saying why when the paper's two are not there (`make
    train-imagenet` asks before it prepares the data for hours)."""
    usage(argv, f"usage: repro-gpus\n\n{' '.join(two_gpus_main.__doc__.split())}")
    resolve_devices(None, require_two_gpus=True)  # the error training would give
    print(f"{torch.cuda.device_count()} GPUs: " + ", ".join(torch.cuda.get_device_name(i)
                                                            for i in range(torch.cuda.device_count())))
    return 0


@entry_point("repro-preflight")
def preflight_main(argv: list[str]) -> int:
    """0 when every check that ran passed, 1 naming the first failure (2: the settings were wrong)."""
    cfg = settings("repro-preflight", "preflight", argv)
    cfg.workers = worker_count(cfg.workers)
    from repro.preflight import preflight

    return preflight(cfg, " ".join(["repro-preflight", *argv]))
