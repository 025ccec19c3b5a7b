"""Fine-tuning: unfreeze all or the last N stages, timm augmentation and mixup/cutmix, separate
learning rates for backbones and head, gradient clipping, an atomic checkpoint every epoch,
and ``resume`` that continues exactly where an interrupted run stopped.

A checkpoint records what identifies its run (``state.json`` key ``"run"``, see :func:`run_identity`):
the fused-model config, the branch names, the class names, the training data and validation split,
and every training option except :data:`RESUME_MAY_CHANGE`. ``resume`` compares them with the run
being resumed and refuses any difference with a ConfigError listing each one ("seed: checkpoint 0,
now 1"); a missing or damaged checkpoint file is an ArtifactError naming the file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.atomic import atomic_directory, recover
from fusion_engine.artifacts.encryption import decrypt_tensors, encrypt_tensors, is_encrypted
from fusion_engine.artifacts.manifest import MODEL_FILE
from fusion_engine.artifacts.safe_files import parse_safetensors
from fusion_engine.artifacts.tensors import state_tensors
from fusion_engine.core.data import collate_images
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ArtifactError, ConfigError, FusionEngineError
from fusion_engine.runtime.runtimes import autocast
from fusion_engine.training.config import seed_everything


def unfreeze(model, last_stages: int | None) -> list[torch.nn.Parameter]:
    """Make backbone parameters trainable (all, or the last N stages); return them."""
    params = []
    for branch in model.branches:
        branch.frozen = False
        branch.backbone.requires_grad_(False)
        groups = (
            branch.backbone.parameter_groups()
            if hasattr(branch.backbone, "parameter_groups")
            else [list(branch.backbone.parameters())]
        )
        chosen = groups if last_stages is None else groups[-last_stages:]
        for group in chosen:
            for p in group:
                p.requires_grad_(True)
                params.append(p)
    return params


class Augmented(torch.utils.data.Dataset):
    """Applies timm's training transform (random resized crop, flip, RandAugment) to uint8 images."""

    def __init__(self, dataset, size: tuple[int, int]):
        from timm.data import create_transform

        self.dataset = dataset
        self.transform = create_transform(
            size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5",
            scale=(0.35, 1.0),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from torchvision.transforms.functional import to_pil_image

        image, label = self.dataset[index]
        image = to_pil_image(image.expand(3, -1, -1) if image.shape[0] == 1 else image)
        return (self.transform(image) * 255).round().to(torch.uint8), label


def _loader(dataset, model, config, epoch: int | None, shuffle: bool):
    """Seeded per epoch (so a resumed run sees the same batches); a DistributedSampler in DDP runs."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + (epoch or 0))
    drop_last = shuffle and len(dataset) > config.batch_size * distributed.world_size()
    sampler = None
    if shuffle and distributed.active():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=config.seed, drop_last=drop_last)
        sampler.set_epoch(epoch or 0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.num_workers,
        drop_last=drop_last,
        collate_fn=functools.partial(collate_images, size=input_size_for(model)),
    )


@torch.no_grad()
def accuracy(model, dataset, config, device) -> float:
    """Validation accuracy; in a distributed run each rank scores its slice and the counts are summed."""
    model.eval()
    part = dataset.subset(list(distributed.shard(len(dataset)))) if distributed.active() else dataset
    correct = 0
    for images, labels in _loader(part, model, config, None, shuffle=False):
        with autocast(device, config.precision):
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    correct, total = distributed.all_sum([correct, len(part)])
    return correct / max(total, 1)


# Options that may differ on resume: where and how fast it runs, and what happens after fine-tuning
# (frozen-mode extraction and head batches, the baselines). Every other option shapes the weights
# (the cosine schedule spans ``epochs``; ``patience`` decides when it stops) and must match.
RESUME_MAY_CHANGE = frozenset({"device", "num_workers", "head_batch_size", "extract_runtime", "baselines"})


def run_identity(model, train_ds, val_ds, config) -> dict:
    """What a resumed run must share with its checkpoint (stored in ``state.json`` as ``"run"``)."""
    options = config.model_dump(mode="json")
    return {
        **{k: v for k, v in options.items() if k not in RESUME_MAY_CHANGE},
        "branches": [branch.name for branch in model.branches],
        "classes": list(model.class_names or []),
        "config": model.config.model_dump(mode="json"),
        "training data": f"{len(train_ds)} images, digest {train_ds.digest()[:16]}",
        "validation data": f"{len(val_ds)} images, digest {val_ds.digest()[:16]}",
    }


_ABSENT = object()


def _short(value, limit: int = 120) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(before, now, where: str = "") -> list[str]:
    """'KEY: checkpoint X, now Y' for each leaf that differs (dicts and equal-length lists descended into)."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in [*before, *(k for k in now if k not in before)]:
            name = f"{where}.{key}" if where else str(key)
            out += _differences(before.get(key, _ABSENT), now.get(key, _ABSENT), name)
        return out
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now) and where != "branches":
        return [d for i, (a, b) in enumerate(zip(before, now)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if before == now else [f"{where}: checkpoint {_short(before)}, now {_short(now)}"]


def check_identity(folder: Path, recorded, identity: dict) -> None:
    """ConfigError listing every difference between the checkpoint's run and this one."""
    if not isinstance(recorded, dict):
        raise ConfigError(
            f"--resume: the checkpoint at {folder} does not record which run wrote it (an older fusion-engine "
            "made it); start without --resume"
        )
    differences = _differences(recorded, identity)
    if differences:
        raise ConfigError(
            f"--resume: the checkpoint at {folder} was written by a different run: {'; '.join(differences)}. "
            "Resume with the same config, data and options, or start without --resume (its checkpoint is then "
            "replaced)"
        )


def _write_tensors(path: Path, tensors: dict, key: bytes | None) -> None:
    """safetensors, encrypted (AES-256-GCM) when the run has an encryption key."""
    data = encrypt_tensors(tensors, key, path.name) if key else safetensors_bytes(tensors)
    path.write_bytes(data)


def _damaged(path: Path, problem) -> ArtifactError:
    return ArtifactError(
        f"checkpoint file {path} is missing or damaged ({problem}); start without --resume (the run begins "
        "again and writes a new checkpoint)"
    )


def _read_tensors(path: Path, key: bytes | None) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _damaged(path, e.strerror or e) from None
    if is_encrypted(data):
        if key is None:
            raise ConfigError(f"checkpoint {path} is encrypted: pass the run's --key-file (or FUSION_ENGINE_KEY)")
        return decrypt_tensors(data, key, path.name)
    try:
        return parse_safetensors(data, path)
    except FusionEngineError as e:
        raise _damaged(path, e) from None


def _save_checkpoint(folder, model, optimizer, scheduler, state: dict, best_state, key: bytes | None = None) -> None:
    opt = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous()
        for i, s in opt["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    with atomic_directory(folder) as tmp:
        _write_tensors(tmp / MODEL_FILE, state_tensors(model), key)
        _write_tensors(tmp / "best.safetensors", best_state, key)  # from state_tensors or read: contiguous, unshared
        _write_tensors(tmp / "optimizer.safetensors", tensors or {"_empty": torch.zeros(0)}, key)
        (tmp / "state.json").write_text(
            json.dumps({**state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()})
        )


def _read_state(folder: Path) -> dict:
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _damaged(path, e.strerror or e) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(path, f"not JSON: {e}") from None
    required = {
        "epoch": int,
        "best": (int, float),
        "stale": int,
        "epochs": list,
        "param_groups": list,
        "scheduler": dict,
    }
    for name, kind in required.items():
        if not isinstance(state.get(name) if isinstance(state, dict) else None, kind):
            raise _damaged(path, f"no valid {name!r}")
    return state


def _load_checkpoint(
    folder: Path, model, optimizer, scheduler, key: bytes | None = None, identity: dict | None = None
) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler from ``folder``; returns (state, best weights).

    With ``identity`` (see :func:`run_identity`) the checkpoint must have been written by the same run."""
    state = _read_state(folder)
    recorded = state.pop("run", None)
    if identity is not None:
        check_identity(folder, recorded, identity)
    weights = _read_tensors(folder / MODEL_FILE, key)
    optimizer_tensors = _read_tensors(folder / "optimizer.safetensors", key)
    best = _read_tensors(folder / "best.safetensors", key)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, tensors in ((MODEL_FILE, weights), ("best.safetensors", best)):
        found = {k: tuple(t.shape) for k, t in tensors.items()}
        if found != expected:
            odd = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
            raise _damaged(folder / name, f"its tensors do not fit this model, e.g. {odd[0]!r}")
    model.load_state_dict(weights, strict=True)
    opt_state: dict = {}
    try:
        for name, value in optimizer_tensors.items():
            if name == "_empty":
                continue
            index, tensor_name = name.split(".", 1)
            opt_state.setdefault(int(index), {})[tensor_name] = value
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, tensors in opt_state.items():
            for tensor_name, value in tensors.items():
                if not 0 <= index < len(params) or (value.ndim and value.shape != params[index].shape):
                    raise ValueError(f"{index}.{tensor_name} has shape {tuple(value.shape)}")
        optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
        scheduler.load_state_dict(state.pop("scheduler"))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _damaged(folder / "optimizer.safetensors", f"it does not fit this run's optimizer: {e}") from None
    if recorded is not None:
        state["run"] = recorded
    return state, best


def finetune(
    model,
    train_ds,
    val_ds,
    config,
    *,
    device,
    log=print,
    progress=True,
    checkpoint_dir=None,
    resume: bool = False,
    encryption_key: bytes | None = None,
) -> dict:
    """Train backbones and fusion end to end; returns the history (per-epoch loss, validation accuracy)."""
    if getattr(model.fusion, "requires_fit", False):
        raise ConfigError(
            f"fusion '{model.config.fusion.name}' is fitted, not trained by gradient; "
            "use --mode frozen with it, or another fusion for finetune"
        )
    backbone_params = unfreeze(model, config.unfreeze)
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": config.backbone_lr}, {"params": head_params, "lr": config.lr}],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            label_smoothing=config.label_smoothing,
            num_classes=model.num_classes,
        )
    train_data = Augmented(train_ds, input_size_for(model)) if config.augment else train_ds
    model.to(device)
    trainer = model
    if distributed.active():  # gradients averaged across ranks
        trainer = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    identity = run_identity(model, train_ds, val_ds, config) if folder is not None else None
    state = {"epoch": 0, "best": -1.0, "stale": 0, "epochs": [], "run": identity}
    best_state = state_tensors(model)
    if resume:
        if folder is not None:
            recover(folder)  # a checkpoint save killed between its renames is put back first
        if folder is None or not (folder / "state.json").is_file():
            raise ConfigError(f"--resume: no checkpoint at {folder}; start without --resume")
        state, best_state = _load_checkpoint(folder, model, optimizer, scheduler, encryption_key, identity)
        log(f"resuming after epoch {state['epoch']} from {folder}")
    shown = progress and distributed.rank() == 0
    epochs_bar = Progress(config.epochs, "fine-tuning", shown, unit="epoch", initial=state["epoch"])
    while state["epoch"] < config.epochs and state["stale"] < config.patience:
        epoch = state["epoch"]
        seed_everything(config.seed * 1000 + epoch)
        trainer.train()
        total, seen = 0.0, 0
        # the batches of one epoch: a live bar on a terminal, erased when the epoch ends
        bar = Progress(len(train_data) // distributed.world_size(), f"epoch {epoch + 1}", shown, transient=True)
        for images, labels in _loader(train_data, model, config, epoch, shuffle=True):
            images, labels = images.to(device), labels.to(device)
            with autocast(device, config.precision):
                if mixup is not None and len(images) % 2 == 0:
                    images, targets = mixup(images, labels)
                    loss = torch.sum(-targets * F.log_softmax(trainer(images).float(), dim=1), dim=1).mean()
                else:
                    loss = F.cross_entropy(trainer(images).float(), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
                )
            optimizer.step()
            total += float(loss.detach()) * len(images)
            seen += len(images)
            bar.update(len(images))
        bar.close()
        scheduler.step()
        val_acc = accuracy(model, val_ds, config, device)
        state["epochs"].append(
            {"epoch": epoch + 1, "loss": round(total / max(seen, 1), 5), "val_accuracy": round(val_acc, 5)}
        )
        if val_acc > state["best"]:
            state["best"], state["stale"] = val_acc, 0
            best_state = state_tensors(model)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        epochs_bar.update(1, val_accuracy=val_acc, best=state["best"])
        if distributed.rank() == 0:
            log(f"epoch {epoch + 1}: loss {state['epochs'][-1]['loss']:.4f}, validation accuracy {val_acc:.4f}")
            if folder is not None:  # only rank 0 writes; the others wait until the checkpoint is complete
                _save_checkpoint(folder, model, optimizer, scheduler, state, best_state, encryption_key)
        distributed.barrier()
    epochs_bar.close()  # early stopping ends the phase before the last epoch
    model.load_state_dict(best_state)
    distributed.broadcast_state(model)  # every rank continues with rank 0's exact weights
    model.eval()
    return {"epochs": state["epochs"], "best_val_accuracy": state["best"]}
