"""fit(): frozen mode (features cached once, head trained on them) and finetune mode.

Both modes: a seeded stratified validation split, early stopping on validation
accuracy, label smoothing, and the baselines (a probe per branch and handcrafted
features) fitted on the same split.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from . import distributed
from .baselines import Baselines, handcrafted_for
from .data import load_dataset, stratified_split
from .errors import DataError
from .evaluation import align_classes, logits_from_features
from .features import FeatureCache


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
    augment: bool = True
    mixup: float = Field(default=0.0, ge=0, description="finetune: mixup alpha (0: off)")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: bfloat16 autocast (finetune)")
    extract_runtime: Literal["torch", "bf16", "onnx"] = Field(default="torch", description=(
        "frozen-mode feature extraction: torch (float32, channels_last on the CPU), bf16 (bfloat16 autocast) or "
        "onnx (onnxruntime on the CPU; needs fusion-engine[onnx])"))
    cutmix: float = Field(default=0.0, ge=0, description="finetune: cutmix alpha (0: off)")
    grad_clip: float | None = Field(default=1.0, gt=0)
    num_workers: int = Field(default=0, ge=0)
    device: str = "auto"
    baselines: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def prepare_data(model, train, val, config: TrainConfig):
    """Load the data, check it against the model, and split off validation data when none is given."""
    train = load_dataset(train)
    if len(train.classes) != model.num_classes:
        raise DataError(f"the data has {len(train.classes)} classes but the model was built for {model.num_classes}; "
                        "build it with num_classes matching the data (or leave num_classes out of the config)")
    if model.class_names is None:
        model.class_names = list(train.classes)
    train = align_classes(model, train)
    if val is None:
        train, val = stratified_split(train, config.val_fraction, config.seed)
    else:
        val = align_classes(model, load_dataset(val))
    return train, val


def fit(model, train, val=None, *, config: TrainConfig | None = None, cache_dir=None, use_cache: bool = True,
        progress: bool = True, log=print, checkpoint_dir=None, resume: bool = False,
        encryption_key: bytes | None = None, **overrides) -> dict:
    """Train ``model`` on ``train`` (any input ``load_dataset`` takes); returns the training history."""
    config = (config or TrainConfig()).model_copy(update=overrides) if overrides else (config or TrainConfig())
    TrainConfig.model_validate(config.model_dump())
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_ds, val_ds = prepare_data(model, train, val, config)
    cache = FeatureCache(cache_dir, enabled=use_cache, runtime=config.extract_runtime)
    history: dict = {"mode": config.mode, "n_train": len(train_ds), "n_val": len(val_ds), "config": config.model_dump()}
    start = time.perf_counter()
    if config.mode == "finetune":
        from .finetune import finetune

        history.update(finetune(model, train_ds, val_ds, config, device=device, log=log, progress=progress,
                                checkpoint_dir=checkpoint_dir, resume=resume, encryption_key=encryption_key))
    model.to(device)
    train_feats = cache.features(model, train_ds, batch_size=config.batch_size, num_workers=config.num_workers,
                                 device=device, progress=progress)
    val_feats = cache.features(model, val_ds, batch_size=config.batch_size, num_workers=config.num_workers,
                               device=device, progress=progress)
    if distributed.active():  # the collective part is over: rank 0 trains the head and saves alone
        history["rank"] = distributed.finish()
        if history["rank"] != 0:
            return history
    history["extract_seconds"] = round(cache.stats["extract_seconds"], 3)
    history["cache"] = dict(cache.stats)
    head_start = time.perf_counter()
    seed_everything(config.seed)  # extraction draws random numbers only on a cache miss: same start either way
    if config.mode == "frozen":
        y, y_val = train_ds.targets, val_ds.targets
        if getattr(model.fusion, "requires_fit", False):
            model.fusion.fit([np.asarray(f) for f in train_feats], y)
            history["epochs"] = []
        else:
            history["epochs"] = train_head(model.fusion, train_feats, y, val_feats, y_val, config, device, log)
    history["head_seconds"] = round(time.perf_counter() - head_start, 3)
    val_pred = logits_from_features(model.fusion, val_feats, device=device).argmax(1)
    history["val_accuracy"] = float((val_pred == val_ds.targets).mean())
    if config.baselines:
        baselines = Baselines([b.feature_dim for b in model.branches], model.num_classes)
        train_hand = handcrafted_for(train_ds, cache)
        val_hand = handcrafted_for(val_ds, cache)
        scores = baselines.fit([np.asarray(f) for f in train_feats], train_ds.targets,
                               [np.asarray(f) for f in val_feats], val_ds.targets,
                               np.asarray(train_hand), np.asarray(val_hand), seed=config.seed)
        model.baselines = baselines
        history["baselines_val_accuracy"] = {
            **{name: scores[f"branch{i}"] for i, name in enumerate(model.branch_names)},
            "handcrafted": scores["handcrafted"]}
    history["seconds"] = round(time.perf_counter() - start, 3)
    model.extras["history"] = history
    model.to("cpu")
    return history


def train_head(head, train_feats, y, val_feats, y_val, config: TrainConfig, device, log=print) -> list[dict]:
    """AdamW with cosine decay on cached features; early stopping keeps the best validation epoch."""
    head.to(device)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, stale, epochs = -1.0, None, 0, []
    batch_size = min(config.head_batch_size, max(16, len(y_t) // 20))  # at least ~20 steps per epoch
    for epoch in range(config.epochs):
        head.train()
        order = torch.randperm(len(y_t), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])
            batch = [torch.from_numpy(np.asarray(f[idx])).to(device) for f in train_feats]
            loss = F.cross_entropy(head(batch), y_t[idx].to(device), label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        scheduler.step()
        val_acc = float((logits_from_features(head, val_feats, device=device).argmax(1) == np.asarray(y_val)).mean())
        epochs.append({"epoch": epoch + 1, "loss": round(total / len(order), 5), "val_accuracy": round(val_acc, 5)})
        if val_acc > best:
            best, best_state, stale = val_acc, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    return epochs
