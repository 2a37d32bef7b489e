"""Dataclass schemas for the Hydra configs, so that a typo or a wrong type fails when the config is composed.

Only the entry points and this module know about Hydra; `build_model` turns a config node into plain keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

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
    num_classes: int = 1000
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


def register_configs() -> None:
    """Make the schemas available to the YAML files under conf/ (`defaults: [schema, _self_]`)."""
    ConfigStore.instance().store(group="model", name="schema", node=ModelConfig)


register_configs()


def model_kwargs(node: Any) -> dict:
    """A model config node as `AlexNet` keywords: enums become their names, unset options are left out."""
    container = OmegaConf.to_container(node, enum_to_str=True) if isinstance(node, DictConfig) else dict(node)
    return {key: value.name if isinstance(value, Enum) else value
            for key, value in container.items() if value is not None}


def build_model(node: Any, devices: Sequence = ("cpu", "cpu")) -> model_lib.AlexNet:
    """The network a `model` config node describes, with its towers on `devices`."""
    return model_lib.AlexNet(devices=devices, **model_kwargs(node))
