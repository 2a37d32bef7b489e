"""Dataclass schemas for the Hydra configs, so that a typo or a wrong type fails when the config is composed, and
the builders that turn config nodes into the model and the augmentation.

Every list of choices comes from the code that uses it (the model's presets and choices, `Augment`'s, the
schedules', the autocast types): the schema and the code cannot disagree. Every numeric setting is checked once,
where a command reads its config (`validate`: finite, and within the limits its field declares with `limited`).
Only the entry points and this module know about Hydra.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
from hydra import compose, initialize, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from repro import data as data_lib
from repro import model as model_lib
from repro import optim as optim_lib
from repro import sources as sources_lib
from repro import speed as speed_lib
from repro import store as store_lib
from repro.errors import RunError
from repro.io import available_cores

# The Hydra configs live beside the package in the source tree (an editable install keeps them there).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def choices(name: str, values) -> type[Enum]:
    """An enumeration of the allowed values of a setting, named by them."""
    return Enum(name, {str(v): v for v in values})


Preset = choices("Preset", model_lib.PRESETS)

# Seeds go to torch.manual_seed, which takes integers below 2**64, and to numpy's generators, which take any
# non-negative integer: a seed is below 2**64.
SEED_LIMIT = 2**64

# The limits a numeric setting may carry (`limited`), as tests of (value, bound).
LIMITS = {"at_least": operator.ge, "above": operator.gt, "at_most": operator.le, "below": operator.lt}


def limited(default=None, *, factory=None, **limits):
    """A numeric setting's field with its allowed range (keywords of LIMITS; for a list, of each item), which
    `validate` checks when a command reads its config. A bound may depend on the machine: a function, called when
    the value is checked, whose docstring names the bound in the error (e.g. `io.available_cores`)."""
    assert set(limits) <= set(LIMITS), limits
    metadata = {"limits": limits}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


def validate(cfg: DictConfig, prefix: str = "") -> None:
    """Check every number of a config composed from a schema of this module, once, where a command reads it:
    each must be finite and within its field's limits. RunError names the first that is not (key, value, rule)."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    for spec in dataclasses.fields(schema):
        if OmegaConf.is_missing(cfg, spec.name):
            continue
        key, value = prefix + spec.name, cfg[spec.name]
        if isinstance(value, DictConfig):
            validate(value, f"{key}.")
            continue
        many = isinstance(value, ListConfig)
        for item in value if many else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            shown = f"{key}={list(value) if many else value}: {'each value ' if many else ''}"
            if not math.isfinite(item):
                raise RunError(f"{shown}must be a finite number")
            for rule, bound in spec.metadata.get("limits", {}).items():
                bound, what = (bound(), f" ({bound.__doc__})") if callable(bound) else (bound, "")
                if not LIMITS[rule](item, bound):
                    raise RunError(f"{shown}must be {rule.replace('_', ' ')} {bound}{what}")


def _model_option_type(key: str, default) -> type:
    allowed = model_lib.CHOICES.get(key)
    if allowed and all(isinstance(v, str) for v in allowed):
        return choices("".join(part.title() for part in key.split("_")), allowed)
    return type(default)  # numbers and booleans; AlexNet checks the allowed numbers (towers)


# `preset` sets every option; an option left at null takes the preset's value (repro/model.py, PRESETS). The
# options are the presets' own keys.
ModelConfig = make_dataclass("ModelConfig", [
    ("preset", Preset, field(default=Preset.paper)),
    ("num_classes", Optional[int], limited(None, at_least=1)),  # null: the store's class count (1000 for ILSVRC-2012)
    ("width", float, limited(1.0, above=0)),  # not the paper's: every layer's width times this (tests, smoke runs)
    *((key, Optional[_model_option_type(key, default)], field(default=None))
      for key, default in model_lib.PRESETS["paper"].items())])
ModelConfig.__doc__ = "The network: a preset and any of its options (repro/model.py); null keeps the preset's."

LightingStyle = choices("LightingStyle", data_lib.LIGHTING_STYLES)
MeanCrop = choices("MeanCrop", data_lib.MEAN_CROPS)
Decoder = choices("Decoder", data_lib.DECODERS)
RecordFormat = choices("RecordFormat", store_lib.RECORD_FORMATS)
ScheduleKind = choices("ScheduleKind", optim_lib.SCHEDULE_KINDS)
Autocast = choices("Autocast", [name for name in speed_lib.AUTOCAST_DTYPES if name])


@dataclass
class DataConfig:
    """The prepared store and the paper's input pipeline (repro/data.py, `Augment`, says what each option does)."""

    store: str = MISSING
    batch_size: int = limited(128, at_least=1)  # §5
    # loader processes; null: up to runtime.DEFAULT_WORKERS, leaving a core for the training process
    workers: Optional[int] = limited(None, at_least=0, at_most=available_cores)
    # check every record read against its CRC-32 (bit rot stops the run, naming the row; docs/data.md has the cost)
    verify: bool = True
    decode: Decoder = Decoder.loader  # a JPEG store's records: in the loader's workers, or `gpu` (nvJPEG, devices[0])
    pca_lighting: bool = True  # §4.1
    pca_std: float = limited(0.1, at_least=0)
    lighting_style: LightingStyle = LightingStyle.paper
    mean_crop: MeanCrop = MeanCrop.center
    crop_chunk: int = 1  # or 32
    # use a seeded random subset of this many training images (quick looks)
    limit_train: Optional[int] = limited(None, at_least=1)
    limit_val: Optional[int] = limited(None, at_least=1)  # likewise for validation; metrics then cover a part


@dataclass
class OptimConfig:
    """§5: v <- momentum v - weight_decay lr w - lr grad; w <- w + v."""

    lr: float = limited(0.01, above=0)
    momentum: float = limited(0.9, at_least=0, below=1)
    weight_decay: float = limited(5e-4, at_least=0)
    decay_biases: bool = True  # the 2012 code decayed weights only
    # null: the weights' rate (§5); a number: a fixed rate (2012 run #145: epsB 0.02)
    bias_lr: Optional[float] = limited(None, at_least=0)


@dataclass
class ScheduleConfig:
    """`plateau` (§5) or `milestones` (the 2012 run); see repro/optim.py, `Schedule`. Epochs are counted from 0."""

    kind: ScheduleKind = ScheduleKind.plateau
    patience: int = limited(5, at_least=0)
    max_drops: int = limited(3, at_least=0)
    max_epochs: int = limited(90, at_least=1)
    milestones: List[int] = limited(factory=lambda: [24, 50, 78], at_least=0)
    conv1_slow_epoch: Optional[int] = limited(None, at_least=0)
    conv1_slow_lr: float = limited(1e-5, at_least=0)
    conv1_freeze_epoch: Optional[int] = limited(None, at_least=0)


@dataclass
class SpeedConfig:
    """One-box speed options (repro/speed.py; docs/speed.md says when each helps). The defaults keep
    the paper's float32 numerics (IEEE float32 on GPUs too) and its tower-by-tower layers; `grouped` and
    `cudnn_benchmark` change only the order of float32 sums."""

    grouped: Optional[bool] = False  # true: both towers as one grouped network on their shared device; null: auto
    channels_last: bool = False
    autocast: Optional[Autocast] = None  # null: float32; bf16, or fp16 with a loss scaler
    tf32: bool = False  # TF32 float32 convolutions and matmuls on Ampere+ GPUs; false: IEEE float32 (the paper's)
    compile: bool = False  # torch.compile, one region per tower stage (single-device regions)
    cudnn_benchmark: Optional[bool] = None  # null: on unless `deterministic`
    prefetch: bool = True  # copy the next batch to the GPU on a side stream while this step computes


@dataclass
class TrainConfig:
    """Everything one training run needs. `devices: null` picks what exists (two GPUs, one GPU for both towers,
    or the CPU); `require_two_gpus` makes a run refuse fewer than two GPUs unless `devices` is set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    name: str = "run"
    devices: Optional[List[str]] = None
    require_two_gpus: bool = False
    seed: int = limited(0, at_least=0, below=SEED_LIMIT)
    deterministic: bool = False
    run_dir: Optional[str] = None  # the entry point fills in Hydra's output folder
    checkpoint_every: int = limited(500, at_least=1)  # steps between checkpoints (and at every epoch's end)
    ten_crop_every: int = limited(0, at_least=0)  # epochs between 10-patch evaluations; 0: only at the end
    eval_batch_size: int = limited(64, at_least=1)  # images per evaluation batch (x10 views with 10 patches)
    log_every: int = limited(50, at_least=1)  # steps between log lines and loss checks
    flat_loss_steps: int = limited(2000, at_least=1)  # warn when the loss sits at ln(classes) this many steps
    dist_backend: Optional[str] = None  # torchrun only; null: gloo for CPU tensors, NCCL for CUDA ones
    # signals that stop training at the end of the current step, with last.pt saved (repro/loop.py, StopSignals)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"])


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    store: Optional[str] = None  # default: the store the checkpoint was trained on
    devices: Optional[List[str]] = None
    batch_size: int = limited(64, at_least=1)  # images per batch (x10 views with 10 patches)
    workers: Optional[int] = limited(None, at_least=0, at_most=available_cores)  # null: the machine's default
    # a JPEG store's records: null decodes them where the run did (its data.decode) when these devices can
    decode: Optional[Decoder] = None
    out: Optional[str] = None  # default: eval_metrics.json beside the checkpoint's run folder
    speed: SpeedConfig = field(default_factory=SpeedConfig)


# The other commands' settings (repro/cli.py), given as key=value like the training's.


Layout = choices("Layout", sources_lib.LAYOUTS)


@dataclass
class PrepareConfig:
    """Prepare ILSVRC-2012 once (§2): raw=<folder with ILSVRC-2012 in any layout docs/data.md lists: image-net.org's
    archives or extracted folders, Kaggle's, Hugging Face's tar.gz or parquet shards, timm's WebDataset shards>
    store=<folder for the prepared store, ~262 GB raw, ~40 GB jpeg>; source: the layout (null: the one raw holds);
    format: raw (exact pixels) or jpeg (records of `quality`, decoded by the loader); skip_bad=true leaves unreadable
    files out; workers: processes (null: every core); draft=false decodes large JPEGs at full size."""

    raw: str = MISSING
    store: str = MISSING
    source: Optional[Layout] = None
    format: RecordFormat = RecordFormat.raw
    quality: int = limited(store_lib.JPEG_QUALITY, at_least=1, at_most=100)  # jpeg only
    skip_bad: bool = False
    workers: Optional[int] = limited(None, at_least=1, at_most=available_cores)
    draft: bool = True


@dataclass
class ConvertConfig:
    """A prepared store in another record format, without the original input: source=<a prepared store>
    store=<folder for the new one> format=jpeg|raw quality=<JPEG quality>; workers: processes (null: every core).
    Restartable like the preparation."""

    source: str = MISSING
    store: str = MISSING
    format: RecordFormat = RecordFormat.jpeg
    quality: int = limited(store_lib.JPEG_QUALITY, at_least=1, at_most=100)  # jpeg only
    workers: Optional[int] = limited(None, at_least=1, at_most=available_cores)


@dataclass
class DemoDataConfig:
    """Write a small synthetic ILSVRC-2012 (its archives and devkit) into raw=<folder>: `num_classes` classes (2 to
    20), `train_per_class` and `val_per_class` images each, from `seed`."""

    raw: str = "data/demo/raw"
    num_classes: int = 10  # the limits of these four: repro/demo_data.py's LIMITS, which make_demo_data checks
    train_per_class: int = 260
    val_per_class: int = 30
    seed: int = 0


@dataclass
class ReportConfig:
    """A finished run beside the paper's numbers: run_dir=<a repro-train run folder> (writes report.md there)."""

    run_dir: str = MISSING


@dataclass
class FiguresConfig:
    """The paper's Figures 3 and 4 into <run>/figures/ and its TensorBoard: run_dir=<run folder> (its last.pt) or
    checkpoint=<file>; which: any of conv1, neighbours, top5; queries: validation images per Figure 4 panel (null:
    the paper's 8 and 5); store: null for the run's own; devices: null for what exists."""

    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    which: List[str] = field(default_factory=lambda: ["conv1", "neighbours", "top5"])
    store: Optional[str] = None
    devices: Optional[List[str]] = None
    queries: Optional[int] = limited(None, at_least=1)
    batch_size: int = limited(64, at_least=1)
    workers: Optional[int] = limited(None, at_least=0, at_most=available_cores)  # null: the machine's default


@dataclass
class Figure1Config:
    """The paper's Figure 1 (ReLU vs tanh on CIFAR-10): data=<CIFAR-10 class folders, or a torchvision CIFAR-10
    root (download=true fetches it)>, out=<folder for figure1_relu_tanh.json/.png>; one run per activation and
    learning rate in `lrs`, at most `epochs` epochs, stopping `extra_epochs` after 25% (null: never early);
    init=paper (N(0, 0.01), raw pixels) or default (PyTorch's, unit-variance inputs); limit: a random subset."""

    data: str = MISSING
    out: str = "docs/figures"
    epochs: int = limited(40, at_least=1)
    extra_epochs: Optional[int] = limited(5, at_least=0)
    lrs: List[float] = limited(factory=lambda: [0.0005, 0.001, 0.002], above=0)
    activations: List[str] = field(default_factory=lambda: ["relu", "tanh"])
    init: str = "paper"
    seed: int = limited(0, at_least=0, below=SEED_LIMIT)
    limit: Optional[int] = limited(None, at_least=1)
    batch_size: int = limited(128, at_least=1)
    device: str = "cpu"
    download: bool = False


@dataclass
class AblationReportConfig:
    """An ablation sweep's summary.md/.json/.png: sweep=<a multirun/<name>/<time> folder>."""

    sweep: str = MISSING


@dataclass
class PreflightConfig:
    """A new box's first check (repro/preflight.py): devices (null: two GPUs, one, or cpu,cpu); batch_size, steps
    and repeats of the speed checks (null: 128, 5, 5 on GPUs; 2, 1, 2 on the CPU); store: a prepared store whose read
    rate bounds the projection, read with `workers` processes; compile: also time speed.compile; checks: a subset
    (null: all); out: the folder for preflight.json (null: runs/preflight/<time>)."""

    devices: Optional[List[str]] = None
    batch_size: Optional[int] = limited(None, at_least=1)
    steps: Optional[int] = limited(None, at_least=1)
    repeats: Optional[int] = limited(None, at_least=1)
    store: Optional[str] = None
    workers: Optional[int] = limited(None, at_least=0, at_most=available_cores)  # null: the machine's default
    compile: bool = False
    checks: Optional[List[str]] = None
    out: Optional[str] = None


TOOL_CONFIGS = {"prepare": PrepareConfig, "convert": ConvertConfig, "demo_data": DemoDataConfig, "report": ReportConfig,
                "figures": FiguresConfig, "figure1": Figure1Config, "ablation_report": AblationReportConfig,
                "preflight": PreflightConfig}


def register_configs() -> None:
    """Make the schemas available to the YAML files under conf/ (`defaults: [schema, _self_]`) and, as
    `<tool>_schema`, to the other commands."""
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for tool, schema in TOOL_CONFIGS.items():
        store.store(name=f"{tool}_schema", node=schema)


register_configs()


def composed(config_name: str, overrides: Sequence[str], conf: bool = True) -> DictConfig:
    """The config `config_name` with key=value `overrides`, as the commands compose it: from conf/ (`conf`) or
    from the schemas alone (the commands other than training's, whose keys must not be read as conf/'s groups).
    Its problems (a typo, a wrong type, an argument that is not key=value) as RunError."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RunError(f"{bad[0]!r}: settings are key=value (e.g. devices=[cpu,cpu]); --help lists them")
    try:
        with (initialize_config_dir(config_dir=CONF_DIR, version_base="1.3") if conf else
              initialize(config_path=None, version_base="1.3")):
            return compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        reasons = [error, *([error.__cause__] if error.__cause__ else [])]  # Hydra puts OmegaConf's reason there
        raise RunError("; ".join(line.strip() for reason in reasons for line in str(reason).splitlines()
                                 if line.strip() and not line.strip().startswith(("full_key", "object_type",
                                                                                  "reference_type")))) from None


def plain(node: Any) -> dict:
    """A config node (or dict) as a dict of plain values: enums become their names."""
    container = OmegaConf.to_container(node, enum_to_str=True) if isinstance(node, DictConfig) else dict(node)
    return {key: value.name if isinstance(value, Enum) else value for key, value in container.items()}


def model_kwargs(node: Any) -> dict:
    """A model config node as `AlexNet` keywords: unset options are left out."""
    return {key: value for key, value in plain(node).items() if value is not None}


def build_model(node: Any, devices: Sequence = ("cpu", "cpu")) -> model_lib.AlexNet:
    """The network a `model` config node describes, with its towers on `devices`."""
    return model_lib.AlexNet(devices=devices, **model_kwargs(node))


# The data settings that are `Augment`'s options: its keyword parameters after the statistics and the devices.
AUGMENT_OPTIONS = tuple(inspect.signature(data_lib.Augment).parameters)[4:]


def augment_options(node: Any) -> dict:
    """The augmentation's settings among a `data` config node's (for `Augment` and the run's record)."""
    settings = plain(node)
    return {key: settings[key] for key in AUGMENT_OPTIONS}


def build_augment(node: Any, stats: dict[str, np.ndarray], devices: Sequence) -> data_lib.Augment:
    """The input pipeline a `data` config node describes, with a store's statistics, on the towers' `devices`."""
    return data_lib.Augment(stats["mean_image"], stats["eigvals"], stats["eigvecs"], devices=devices,
                            **augment_options(node))
