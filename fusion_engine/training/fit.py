"""fit(): frozen mode (features cached once, head trained on them) and finetune mode.

Both modes: a seeded stratified validation split, early stopping on validation
accuracy, label smoothing, and the baselines (a probe per branch and handcrafted
features) fitted on the same split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.tensors import state_tensors
from fusion_engine.core.data import align_classes, load_dataset, stratified_split
from fusion_engine.core.probes import Baselines
from fusion_engine.core.progress import PhaseClock, Progress
from fusion_engine.errors import DataError
from fusion_engine.training.baselines import fit_baselines, handcrafted_for
from fusion_engine.training.config import TrainConfig, resolve_device, seed_everything, train_config
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.top_blocks import TopBlocks
from fusion_engine.training.view_selection import fit_with_views
from fusion_engine.training.views import ViewDataset, mean_of_views


def _shown(classes) -> str:
    """The class names as a Python list, shortened when long."""
    names = [str(c) for c in classes]
    return repr(names) if len(names) <= 6 else repr(names[:3])[:-1] + ", ..., " + repr(names[-1:])[1:]


def prepare_data(model, train, val, config: TrainConfig):
    """Load the data, check it against the model, and split off validation data when none is given."""
    train = load_dataset(train)
    if len(train.classes) != model.num_classes:
        raise DataError(
            f"the data has {len(train.classes)} classes but the model was built for {model.num_classes}; "
            f"build it for this data: engine.build(config, class_names={_shown(train.classes)}) or "
            f"engine.build(config, num_classes={len(train.classes)}) (a num_classes in the config must match too)"
        )
    if model.class_names is None:
        model.class_names = list(train.classes)
    train = align_classes(model, train)
    if val is None:
        train, val = stratified_split(train, config.val_fraction, config.seed)
    else:
        val = align_classes(model, load_dataset(val))
    return train, val


def fit(
    model,
    train,
    val=None,
    *,
    config: TrainConfig | None = None,
    cache_dir=None,
    use_cache: bool = True,
    progress: bool = True,
    log=print,
    checkpoint_dir=None,
    resume: bool = False,
    encryption_key: bytes | None = None,
    **overrides,
) -> dict:
    """Train ``model`` on ``train`` (any input ``load_dataset`` takes); returns the training history.

    ``history["phase_seconds"]`` holds the wall time of every phase (``data``: loading and splitting;
    ``finetune``; ``extraction``: the branches' and the handcrafted features, cached or not; ``head``:
    head training and its validation score; ``baselines``: fitting the probes; ``other``: the rest),
    adding up to ``history["seconds"]``, the whole call."""
    clock = PhaseClock()
    config = train_config(config, **overrides)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    clock.lap(None)  # options and device: part of "other"
    train_ds, val_ds = prepare_data(model, train, val, config)
    cache = FeatureCache(cache_dir, enabled=use_cache, runtime=config.extract_runtime, log=log)
    history: dict = {"mode": config.mode, "n_train": len(train_ds), "n_val": len(val_ds), "config": config.model_dump()}
    clock.lap("data")
    if config.mode == "finetune":
        from fusion_engine.training.finetune import finetune

        history.update(
            finetune(
                model,
                train_ds,
                val_ds,
                config,
                device=device,
                log=log,
                progress=progress,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                encryption_key=encryption_key,
            )
        )
        clock.lap("finetune")
    model.to(device)
    top = TopBlocks(model, config.train_blocks, config.independent_branches) if config.train_blocks else None

    def extract(dataset):  # features, or for the tops their trunk activations (the other branches' features)
        if top is not None:
            return top.inputs(cache, dataset, config, device, progress=progress)
        return cache.features(
            model,
            dataset,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            device=device,
            progress=progress,
        )

    train_feats, val_feats = extract(train_ds), extract(val_ds)
    top_views = [extract(ViewDataset(train_ds, v)) for v in config.feature_views] if top is not None else []
    val_mirrored = extract(ViewDataset(val_ds, "flip")) if top is not None and config.flip_average else None
    if distributed.active():  # the collective part is over: rank 0 trains the head and saves alone
        history["rank"] = distributed.finish()
        if history["rank"] != 0:
            return history
    history["extract_seconds"] = round(cache.stats["extract_seconds"], 3)
    history["cache"] = dict(cache.stats)  # the branches' features (the handcrafted ones are not counted)
    if config.baselines:  # extracted with the rest, so that "baselines" below is only fitting
        train_hand = np.asarray(handcrafted_for(train_ds, cache, progress=progress))
        val_hand = np.asarray(handcrafted_for(val_ds, cache, progress=progress))
    clock.lap("extraction")
    seed_everything(config.seed)  # extraction draws random numbers only on a cache miss: same start either way
    averaged_val_feats = None  # the validation features flip-averaged, when the model averages
    if config.mode == "frozen":
        y, y_val = train_ds.targets, val_ds.targets
        if top is not None:
            history["epochs"] = top.train(
                train_feats, y, val_feats, y_val, config, device, progress, top_views, val_mirrored
            )
            train_feats, val_feats = top.features(train_feats, device), top.features(val_feats, device)
            if val_mirrored is not None:
                averaged_val_feats = mean_of_views(val_feats, top.features(val_mirrored, device))
            history["views"] = list(config.feature_views)
            history["flip_average"] = bool(config.flip_average)
            model.config.flip_average = bool(config.flip_average)
        elif config.feature_views or config.flip_average:  # which views to train on, chosen on validation
            trainer = lambda head, *data: train_head(head, *data, config, device, log)  # noqa: E731
            entries, averaged_val_feats = fit_with_views(
                model, cache, train_ds, val_ds, train_feats, val_feats, config, device, trainer, progress
            )
            history.update(entries)
        elif getattr(model.fusion, "requires_fit", False):
            model.fusion.fit([np.asarray(f) for f in train_feats], y)
            history["epochs"] = []
        else:
            history["epochs"] = train_head(
                model.fusion, train_feats, y, val_feats, y_val, config, device, log, progress=progress
            )
    seen = val_feats if averaged_val_feats is None else averaged_val_feats
    val_pred = logits_from_features(model.fusion, seen, device=device).argmax(1)
    history["val_accuracy"] = float((val_pred == val_ds.targets).mean())
    history["head_seconds"] = round(clock.lap("head"), 3)
    if config.baselines:
        baselines = Baselines([b.feature_dim for b in model.branches], model.num_classes)
        scores = fit_baselines(
            baselines,
            [np.asarray(f) for f in train_feats],
            train_ds.targets,
            [np.asarray(f) for f in val_feats],
            val_ds.targets,
            train_hand,
            val_hand,
            seed=config.seed,
            names=list(model.branch_names),
            progress=progress,
        )
        model.baselines = baselines
        history["baselines_val_accuracy"] = {
            **{name: scores[f"branch{i}"] for i, name in enumerate(model.branch_names)},
            "handcrafted": scores["handcrafted"],
        }
        clock.lap("baselines")
    else:
        model.baselines = None  # no probes from an earlier fit beside a head they were not fitted with
    total = clock.total
    history["phase_seconds"] = clock.breakdown(total)
    history["seconds"] = round(total, 3)
    model.history = history
    model.fitted = True
    model.to("cpu")
    return history


def train_head(
    head, train_feats, y, val_feats, y_val, config: TrainConfig, device, log=print, progress: bool = False
) -> list[dict]:
    """AdamW with cosine decay on cached features; early stopping keeps the best validation epoch.
    ``progress``: a bar over the epochs with the validation accuracy."""
    head.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, stale, epochs = -1.0, None, 0, []
    batch_size = min(config.head_batch_size, max(16, len(y_t) // 20))  # at least ~20 steps per epoch
    bar = Progress(config.epochs, "head training", progress, unit="epoch")
    for epoch in range(config.epochs):
        head.train()
        order = torch.randperm(len(y_t), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start : start + batch_size])
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
            best, best_state, stale = val_acc, state_tensors(head), 0
        else:
            stale += 1
        bar.update(1, val_accuracy=val_acc, best=best)
        if stale >= config.patience:
            break
    bar.close()  # early stopping ends the phase before the last epoch
    head.load_state_dict(best_state)
    return epochs
