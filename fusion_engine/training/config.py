"""Training options (TrainConfig), seeding and device choice shared by every training path."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fusion_engine.core.config import validated


class TrainConfig(BaseModel):
    """Training options (the CLI flags of ``fusion-engine train``)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["frozen", "finetune"] = "frozen"
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=64, ge=1, description="extraction and fine-tuning batch size")
    head_batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="head learning rate")
    backbone_lr: float = Field(default=1e-4, gt=0, description="backbone learning rate (finetune)")
    weight_decay: float = Field(default=1e-4, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    patience: int = Field(default=8, ge=1, description="epochs without validation gain before stopping")
    seed: int = 0
    unfreeze: int | None = Field(default=None, ge=1, description="finetune: last N stages (None: all)")
    train_blocks: int = Field(
        default=0,
        ge=0,
        description=(
            "frozen: also train the last N stages of every timm branch, on trunk activations cached once "
            "(training.top_blocks; 0: head only)"
        ),
    )
    independent_branches: bool = Field(
        default=False,
        description=(
            "with train_blocks: each branch's top and head train on that branch's own loss, with their own early "
            "stopping, and the fusion combines them (a late-fusion ensemble; fusions with a head per branch: vote)"
        ),
    )
    augment: bool = True
    mixup: float = Field(default=0.0, ge=0, description="finetune: mixup alpha (0: off)")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: bfloat16 autocast (finetune)")
    extract_runtime: Literal["auto", "torch", "bf16", "onnx", "int8"] = Field(
        default="auto",
        description=(
            "frozen-mode feature extraction: auto (onnx on the CPU when onnxruntime is installed, else torch), torch "
            "(float32, channels_last on the CPU), bf16 (bfloat16 autocast), onnx (onnxruntime on the CPU) or int8 "
            "(onnxruntime, static int8); onnx and int8 graphs are checked against torch first and fall back if they disagree"
        ),
    )
    feature_views: list[Literal["flip", "shift"]] | Literal["auto"] = Field(
        default_factory=list,
        description=(
            "frozen: also train the head on the features of these views of each training image (flip: mirrored, "
            "shift: moved by 1/16 of the side), each cached once; auto: keep what scores best on validation"
        ),
    )
    flip_average: bool | Literal["auto"] = Field(
        default=False,
        description="frozen: the model averages each image's features with its mirror image's (auto: if validation gains)",
    )
    cutmix: float = Field(default=0.0, ge=0, description="finetune: cutmix alpha (0: off)")
    grad_clip: float | None = Field(default=1.0, gt=0)
    num_workers: int = Field(default=0, ge=0)
    device: str = "auto"
    baselines: bool = True

    @field_validator("train_blocks")
    @classmethod
    def _frozen_mode_only(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("mode") != "frozen":
            raise ValueError("top blocks train in frozen mode; in finetune mode choose the stages with unfreeze")
        return value

    @field_validator("independent_branches")
    @classmethod
    def _with_top_blocks(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("train_blocks"):
            raise ValueError(
                "independent branches train their top blocks apart: set train_blocks too (train --train-blocks 2 "
                "--independent-branches --fusion vote)"
            )
        return value

    @field_validator("feature_views", "flip_average")
    @classmethod
    def _on_frozen_features(cls, value, info: ValidationInfo):
        if value and info.data.get("mode") != "frozen":
            raise ValueError(
                f"{info.field_name} works on frozen features: use it in frozen mode (in finetune mode, augment "
                "applies flips and crops to the images)"
            )
        if value == "auto" and info.data.get("train_blocks"):
            raise ValueError(
                f"with train_blocks, name the views (feature_views=['flip'], flip_average=True; train --views "
                f"flip,flip-average); {info.field_name}='auto' chooses on frozen features only"
            )
        return value


def held_out_runtime(config: TrainConfig) -> str:
    """The extraction runtime for the held-out features of a model trained with ``config``: the training runtime
    when the backbones stay as they were (the same cached graphs), torch when training changed them (finetune,
    top blocks), whose graphs would otherwise be exported again."""
    return config.extract_runtime if config.mode == "frozen" and not config.train_blocks else "torch"


def train_config(config: TrainConfig | None = None, **overrides) -> TrainConfig:
    """``config`` (default: TrainConfig()) with ``overrides``, validated: a misspelt option or a bad
    value is a ConfigError naming it and the valid options."""
    return validated(TrainConfig, {**(config or TrainConfig()).model_dump(), **overrides}, "training options")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)
