"""Dataclass schemas for the Hydra configs, so that a typo or a wrong type fails when the config is composed.

Only the entry points and this module know about Hydra; `build_model` turns a config node into plain keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from repro import model as model_lib

# Enumerations made from the model's own lists of allowed values, so the two can never disagree.
Preset = Enum("Preset", {name: name for name in model_lib.PRESETS})
LrnPosition = Enum("LrnPosition", {v: v for v in model_lib.CHOICES["lrn_position"]})
DropoutStyle = Enum("DropoutStyle", {v: v for v in model_lib.CHOICES["dropout_style"]})
Conv1Padding = Enum("Conv1Padding", {v: v for v in model_lib.CHOICES["conv1_padding"]})
Init = Enum("Init", {v: v for v in model_lib.CHOICES["init"]})


@dataclass
class ModelConfig:
    """`preset` sets every option; an option left at null takes the preset's value (see repro/model.py)."""

    preset: Preset = Preset.paper
    num_classes: Optional[int] = None  # null: the prepared store's class count (1000 for ILSVRC-2012)
    lrn: Optional[bool] = None
    lrn_position: Optional[LrnPosition] = None
    lrn_alpha_over_n: Optional[bool] = None
    spatial_norm: Optional[bool] = None
    overlap_pool: Optional[bool] = None
    towers: Optional[int] = None
    dropout: Optional[bool] = None
    dropout_style: Optional[DropoutStyle] = None
    conv1_padding: Optional[Conv1Padding] = None
    init: Optional[Init] = None
    init_bias: Optional[float] = None


LightingStyle = Enum("LightingStyle", {v: v for v in ("paper", "cuda_convnet")})
MeanCrop = Enum("MeanCrop", {v: v for v in ("center", "aligned")})
ScheduleKind = Enum("ScheduleKind", {v: v for v in ("plateau", "milestones")})


@dataclass
class DataConfig:
    """The prepared store and the paper's input pipeline (repro/data.py, `Augment`, says what each option does)."""

    store: str = MISSING
    batch_size: int = 128  # §5
    workers: int = 2
    pca_lighting: bool = True  # §4.1
    pca_std: float = 0.1
    lighting_style: LightingStyle = LightingStyle.paper
    mean_crop: MeanCrop = MeanCrop.center
    crop_chunk: int = 1
    limit_train: Optional[int] = None  # use a seeded random subset of this many training images (quick looks)
    limit_val: Optional[int] = None  # likewise for validation; metrics then do not cover the whole split


@dataclass
class OptimConfig:
    """§5: v <- momentum v - weight_decay lr w - lr grad; w <- w + v."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_biases: bool = True  # the 2012 code decayed weights only
    bias_lr: Optional[float] = None  # null: the weights' rate (§5); a number: a fixed rate (2012 run #145: epsB 0.02)


@dataclass
class ScheduleConfig:
    """`plateau` (§5) or `milestones` (the 2012 run); see repro/optim.py, `Schedule`. Epochs are counted from 0."""

    kind: ScheduleKind = ScheduleKind.plateau
    patience: int = 5
    max_drops: int = 3
    max_epochs: int = 90
    milestones: List[int] = field(default_factory=lambda: [24, 50, 78])
    conv1_slow_epoch: Optional[int] = None
    conv1_slow_lr: float = 1e-5
    conv1_freeze_epoch: Optional[int] = None


Autocast = Enum("Autocast", {v: v for v in ("bf16", "fp16")})


@dataclass
class SpeedConfig:
    """One-box speed options (repro/speed.py; the README's "Speed" section says when each helps). The defaults keep
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
    seed: int = 0
    deterministic: bool = False
    run_dir: Optional[str] = None  # the entry point fills in Hydra's output folder
    checkpoint_every: int = 500  # steps between checkpoints (and at every epoch's end)
    ten_crop_every: int = 0  # epochs between 10-patch evaluations; 0: only at the end
    eval_batch_size: int = 64  # images per evaluation batch (x10 views with 10 patches)
    log_every: int = 50  # steps between log lines and loss checks
    flat_loss_steps: int = 2000  # warn when the loss sits at ln(classes) this many steps
    dist_backend: Optional[str] = None  # torchrun only; null: gloo for CPU tensors, NCCL for CUDA ones


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    store: Optional[str] = None  # default: the store the checkpoint was trained on
    devices: Optional[List[str]] = None
    batch_size: int = 64  # images per batch (x10 views with 10 patches)
    workers: int = 2
    out: Optional[str] = None  # default: eval_metrics.json beside the checkpoint's run folder
    speed: SpeedConfig = field(default_factory=SpeedConfig)


def register_configs() -> None:
    """Make the schemas available to the YAML files under conf/ (`defaults: [schema, _self_]`)."""
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)


register_configs()


def model_kwargs(node: Any) -> dict:
    """A model config node as `AlexNet` keywords: enums become their names, unset options are left out."""
    container = OmegaConf.to_container(node, enum_to_str=True) if isinstance(node, DictConfig) else dict(node)
    return {key: value.name if isinstance(value, Enum) else value
            for key, value in container.items() if value is not None}


def build_model(node: Any, devices: Sequence = ("cpu", "cpu")) -> model_lib.AlexNet:
    """The network a `model` config node describes, with its towers on `devices`."""
    return model_lib.AlexNet(devices=devices, **model_kwargs(node))
