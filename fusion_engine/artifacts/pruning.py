"""Structured channel pruning of a fused model's backbones, the recovery fine-tune after it, and the
reshaping of a freshly built model to the pruned shapes on load. ``compression.py`` checks the order of
the methods and records the steps.

Each backbone's channels are pruned with torch-pruning (its dependency graph keeps residual additions,
depthwise groups and batch norms consistent) by L2 magnitude; channels are really removed, so FLOPs and
latency fall. Each branch keeps its output width, so the fusion head is untouched. The step records every
changed layer's attributes and tensor shapes; load rebuilds the layers at those shapes (torch-pruning is not
needed to load). With training data, a short recovery follows: the backbones' batch-norm statistics are
re-estimated (pruning made them stale), then the whole model is fine-tuned with them fixed, on cross-entropy
plus distillation from the unpruned model. The baselines kept with the model (per-branch probes) no longer
match the pruned features and are dropped.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from fusion_engine.core.data import align_classes, load_dataset
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ArtifactError, ConfigError

SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "normalized_shape",
    "num_channels",
    "num_groups",
)


# --- prune ------------------------------------------------------------------------------------------


def _final_layer(backbone, x: torch.Tensor, width: int):
    """The last conv/linear layer run whose output width is the branch's feature width (kept intact)."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((mod, out)))
        for n, m in backbone.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        for h in hooks:
            h.remove()
    for module, out in reversed(calls):
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and width in (out.shape[1], out.shape[-1]):
            return module
    return None


def _prune_branch(model, index: int, ratio: float, round_to: int | None) -> None:
    import torch_pruning as tp

    branch = model.branches[index]
    backbone = branch.backbone
    c, h, w = backbone.data_config["input_size"]
    x = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    width = branch.feature_dim
    ignored = [m for m in [_final_layer(backbone, x, width)] if m is not None]
    for module in backbone.modules():  # attention heads need head-aware pruning: leave attention layers whole
        if hasattr(module, "num_heads"):
            ignored += [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    backbone.eval()
    backbone.requires_grad_(True)  # the dependency graph only considers trainable parameters
    try:
        pruner = tp.pruner.MetaPruner(
            backbone,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=round_to,
        )
        pruner.step()
        with torch.no_grad():
            out = branch(x)
    except Exception as e:  # a backbone whose graph torch-pruning cannot follow
        raise ConfigError(
            f"branch '{branch.name}': structured pruning failed ({type(e).__name__}: {e}); "
            "this backbone cannot be pruned (the in-memory model is now unusable)"
        ) from e
    finally:
        if branch.frozen:
            backbone.requires_grad_(False)
    if out.dim() != 2 or out.shape[1] != width:
        raise ConfigError(
            f"branch '{branch.name}': pruning changed its output from width {width} to "
            f"{tuple(out.shape)}; this backbone cannot be pruned"
        )


def _module_record(module) -> dict:
    attrs = {}
    for a in SHAPE_ATTRS:
        value = getattr(module, a, None)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[a] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            attrs[a] = list(value)
    names = set(module.state_dict(keep_vars=True).keys())
    tensors = {
        n: list(t.shape)
        for n, t in [*module._parameters.items(), *module._buffers.items()]
        if t is not None and n in names
    }
    return {"type": type(module).__name__, "attrs": attrs, "tensors": tensors}


def count_macs(model) -> tuple[int, int]:
    """(multiply-accumulates per image, parameters) of the whole fused model, at its largest input size."""
    import torch_pruning as tp  # optional: needed to prune and measure, not to load

    channels = max(b.backbone.data_config["input_size"][0] for b in model.branches)
    x = torch.rand(1, channels, *input_size_for(model))
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, x)
    model.train(was_training)
    return int(macs), int(params)


def prune(
    model,
    *,
    ratio: float = 0.3,
    train=None,
    epochs: int = 1,
    lr: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    round_to: int | None = None,
    device: str = "cpu",
    log=print,
    progress: bool = True,
) -> dict:
    """Remove ``ratio`` of each backbone's prunable channels, then fine-tune on ``train`` for ``epochs``;
    returns the step (the shapes of every changed layer, and measurements)."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise ConfigError(
            "pruning needs the torch-pruning package: pip install 'fusion-engine[compress]' "
            "(or pip install torch-pruning)"
        ) from None
    if not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio}")
    model.eval()
    teacher = copy.deepcopy(model).eval() if train is not None else None
    macs_before, params_before = count_macs(model)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    pruned_backbones = set()
    for i, branch in enumerate(model.branches):
        if id(branch.backbone) not in pruned_backbones:  # a backbone shared by several branches is pruned once
            pruned_backbones.add(id(branch.backbone))
            _prune_branch(model, i, ratio, round_to)
    after = model.state_dict()
    if set(after) != set(before):
        raise ConfigError("pruning added or removed tensors instead of resizing them; this model cannot be pruned")
    changed = sorted({k.rpartition(".")[0] for k, v in after.items() if tuple(v.shape) != before[k]})
    if not changed:
        raise ConfigError(f"pruning ratio {ratio} removed no channel; raise --ratio")
    macs_after, params_after = count_macs(model)
    model.baselines = None  # per-branch probes were fitted on the unpruned features
    info = {
        "ratio": ratio,
        "importance": "L2 magnitude, per layer (torch-pruning MetaPruner)",
        "round_to": round_to,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
    }
    if train is not None:
        info["recovery"] = recover(
            model,
            teacher,
            train,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
            log=log,
            progress=progress,
        )
    return {
        "method": "prune",
        "pruned": {name: _module_record(model.get_submodule(name)) for name in changed},
        "info": info,
    }


def reshape(model, pruned: dict) -> None:
    """Resize the layers named in a prune step's ``pruned`` to the recorded shapes (values come from the tensors)."""
    for name, record in pruned.items():
        kind, attrs, tensors = record["type"], record["attrs"], record["tensors"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the manifest's pruned layer {name!r} is not in the rebuilt model") from None
        if type(module).__name__ != kind:
            raise ArtifactError(
                f"pruned layer {name!r} is a {type(module).__name__} in the rebuilt model, the manifest says {kind}"
            )
        for attr, value in attrs.items():
            if attr not in SHAPE_ATTRS or not hasattr(module, attr):
                raise ArtifactError(f"pruned layer {name!r}: attribute {attr!r} cannot be set")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for tensor_name, shape in tensors.items():
            table = module._parameters if module._parameters.get(tensor_name) is not None else module._buffers
            old = table.get(tensor_name)
            if old is None:
                raise ArtifactError(f"pruned layer {name!r} has no tensor {tensor_name!r}")
            if len(shape) != old.dim() or any(not 0 <= n <= o for n, o in zip(shape, old.shape)):
                raise ArtifactError(
                    f"pruned tensor '{name}.{tensor_name}': shape {shape} is not a pruning of {list(old.shape)}"
                )
            new = torch.empty(shape, dtype=old.dtype)
            table[tensor_name] = (
                nn.Parameter(new, requires_grad=old.requires_grad) if table is module._parameters else new
            )


# --- recovery fine-tune -----------------------------------------------------------------------------


def recover(
    model,
    teacher,
    train,
    *,
    epochs: int = 1,
    lr: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 2.0,
    calibration_batches: int = 50,
    device: str = "cpu",
    log=print,
    progress: bool = True,
) -> dict:
    """Recover accuracy after pruning: re-estimate the backbones' batch-norm statistics on up to
    ``calibration_batches`` batches of ``train``, then fine-tune the whole model for ``epochs`` with
    those statistics fixed, on cross-entropy plus distillation from ``teacher`` (the unpruned model)."""
    dataset = align_classes(model, load_dataset(train))
    torch.manual_seed(seed)
    loader = make_loader(dataset, model, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    frozen = [b.frozen for b in model.branches]
    for b in model.branches:
        b.frozen = False
    fitted = getattr(model.fusion, "requires_fit", False)
    params = [p for b in model.branches for p in b.backbone.parameters()]
    params += [] if fitted else list(model.fusion.parameters())
    params = list({id(p): p for p in params}.values())  # shared backbones: each parameter once
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    total = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    model.to(device)
    teacher.to(device)
    norms = list(
        {
            id(m): m
            for b in model.branches
            for m in b.backbone.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }.values()
    )
    history, start = [], time.perf_counter()
    try:
        calibrated = _recalibrate(model, norms, loader, calibration_batches, device)
        for epoch in range(epochs):
            model.train()
            for norm in norms:  # statistics stay as recalibrated: stable with small batches and short runs
                norm.eval()
            running, seen = 0.0, 0
            bar = Progress(len(dataset), f"recovery epoch {epoch + 1}/{epochs}", progress)
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                with torch.no_grad():
                    soft = torch.softmax(teacher(images) / temperature, dim=1)
                logits = model(images)
                distill = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
                loss = 0.5 * F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5 * temperature**2 * distill
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                running += float(loss.detach()) * len(images)
                seen += len(images)
                bar.update(len(images))
            history.append({"epoch": epoch + 1, "loss": round(running / max(seen, 1), 5)})
            log(f"recovery epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}")
    finally:
        for b, was_frozen in zip(model.branches, frozen):
            b.frozen = was_frozen
            if was_frozen:
                b.backbone.requires_grad_(False)
        model.to("cpu").eval()
        teacher.to("cpu")
    return {
        "epochs": history,
        "n_train": len(dataset),
        "lr": lr,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - start, 1),
        "batch_norm_recalibrated_on": calibrated,
        "loss": "0.5 CE(label smoothing 0.1) + 0.5 T^2 KL, T=2",
    }


@torch.no_grad()
def _recalibrate(model, norms, loader, batches: int, device) -> int:
    """Re-estimate the backbones' batch-norm statistics (pruning made them stale); returns images seen."""
    if not norms or batches <= 0:
        return 0
    saved = [(norm.momentum, norm.training) for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
        norm.train()
    seen = 0
    try:
        for i, (images, _) in enumerate(loader):
            if i >= batches:
                break
            model.branch_features(images.to(device))
            seen += len(images)
    finally:
        for norm, (momentum, training) in zip(norms, saved):
            norm.momentum = momentum
            norm.train(training)
    return seen
