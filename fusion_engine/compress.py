"""Compression of a fused model: float16 storage, int8 linear layers, structured channel pruning.

Each method changes the model in memory and appends a step to ``model.extras["compression"]``.
``artifacts.save`` writes the steps into the manifest and the tensors in a form safetensors
can hold; ``artifacts.load`` builds the model from its config, replays the steps (reshapes the
pruned layers, swaps in the int8 layers), then loads the tensors strictly. Nothing is pickled.

- ``fp16``: every float32 tensor is stored as float16 (those beyond float16's range stay float32).
  Load casts them back to float32, so CPU inference runs in float32 as before: the file halves,
  the accuracy changes only by float16 rounding, latency does not change.
- ``int8``: every ``nn.Linear`` becomes a torch.ao dynamically quantised linear layer (int8
  weights, symmetric per-output-channel scales, activations quantised on the fly). Stored as
  plain tensors ``<layer>.weight_int8`` (int8), ``<layer>.weight_scale`` (float32),
  ``<layer>.weight_zero_point`` (int64) and ``<layer>.bias``.
- ``prune``: structured pruning of each backbone's channels with torch-pruning (its dependency
  graph keeps residual additions, depthwise groups and batch norms consistent) by L2 magnitude;
  channels are really removed, so FLOPs and latency fall. Each branch keeps its output width, so
  the fusion head is untouched. The manifest records every changed layer's attributes and tensor
  shapes; load rebuilds the layers at those shapes (torch-pruning is not needed to load). With
  training data, a short recovery follows: the backbones' batch-norm statistics are re-estimated
  (pruning made them stale), then the whole model is fine-tuned with them fixed, on cross-entropy
  plus distillation from the unpruned model. The baselines kept with the model (per-branch probes) no longer match
  the pruned features and are dropped.

Methods apply in the order prune -> int8 -> fp16; a model already compressed can take the later
methods only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArtifactError, ConfigError

METHODS = ("prune", "int8", "fp16")  # the order in which methods compose
FP16_MAX = 65504.0
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "normalized_shape", "num_channels", "num_groups")
KEEP_FLOAT_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def steps(model) -> list[dict]:
    """The compression steps applied to ``model`` so far (dicts as in the manifest)."""
    return list(model.extras.get("compression") or [])


def _quantized(step_list) -> list[str]:
    return [name for s in step_list if _get(s, "method") == "int8" for name in _get(s, "quantized")]


def _get(step, key):
    return step[key] if isinstance(step, dict) else getattr(step, key)


def _check_order(model, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    done = [s["method"] for s in steps(model)]
    if method in done:
        raise ConfigError(f"this model is already compressed with {method}")
    later = [m for m in done if METHODS.index(m) > METHODS.index(method)]
    if later:
        raise ConfigError(f"{method} must come before {', '.join(later)}, which this model already has; "
                          f"compress the uncompressed model with the methods in the order {' -> '.join(METHODS)}")


def _append(model, step: dict) -> None:
    model.extras["compression"] = [*steps(model), step]


# --- fp16 -------------------------------------------------------------------------------------------


def _fits_fp16(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and (t.numel() == 0 or float(t.abs().max()) <= FP16_MAX)


def to_fp16(model) -> dict:
    """Round every float32 tensor to float16 precision now; save() stores them as float16."""
    _check_order(model, "fp16")
    quantized = tuple(n + "." for n in _quantized(steps(model)))
    rounded, kept = 0, []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or (quantized and name.startswith(quantized)):
                continue
            if _fits_fp16(t):
                t.copy_(t.half().float())
                rounded += 1
            else:
                kept.append(name)
    step = {"method": "fp16", "info": {"stored_dtype": "float16", "compute_dtype": "float32",
                                       "tensors_float16": rounded, "kept_float32": kept}}
    _append(model, step)
    return step


# --- int8 -------------------------------------------------------------------------------------------


def quantize_int8(model) -> dict:
    """Swap every nn.Linear for a dynamically quantised int8 linear layer (per-channel weights)."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    _check_order(model, "int8")
    model.eval()
    # torch's transformer layers read their linear layers' .weight directly (fast path): those stay float
    keep_float = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, KEEP_FLOAT_PARENTS)
                  for c, _ in m.named_children()}
    eligible = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep_float]
    if not eligible:
        raise ConfigError("int8: this model has no nn.Linear layers that can be quantised")
    with _quiet_torch_ao():
        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in eligible}, dtype=torch.qint8, inplace=True)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QLinear))
    step = {"method": "int8", "quantized": names,
            "info": {"scheme": "torch.ao dynamic, qint8 weights, per-channel symmetric", "layers": len(names),
                     "kept_float": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)}}
    _append(model, step)
    return step


@contextlib.contextmanager
def _quiet_torch_ao():
    """torch marks torch.ao quantisation deprecated (pytorch/pytorch#184982; successor: torchao). It still works,
    and the warnings would print on every load of an int8 model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        yield


def _swap_in_quantized(model, names) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    for name in names:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        layer = getattr(parent, attr, None) if parent is not None else None
        if type(layer) is not nn.Linear:
            raise ArtifactError(f"the manifest's int8 layer {name!r} is not a Linear layer of the rebuilt model")
        setattr(parent, attr, QLinear(layer.in_features, layer.out_features, bias_=layer.bias is not None,
                                      dtype=torch.qint8))


def _pack_int8(model, names, out: dict) -> None:
    for name in names:
        weight, bias = model.get_submodule(name)._weight_bias()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        else:
            scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float64)
            zero_point = torch.full((weight.shape[0],), weight.q_zero_point(), dtype=torch.int64)
        out[f"{name}.weight_int8"] = weight.int_repr().contiguous().clone()
        out[f"{name}.weight_scale"] = scale.to(torch.float32).contiguous().clone()
        out[f"{name}.weight_zero_point"] = zero_point.to(torch.int64).contiguous().clone()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().float().contiguous().clone()


def _unpack_int8(model, names, tensors: dict) -> None:
    for name in names:
        layer = model.get_submodule(name)
        out_f, in_f = layer.out_features, layer.in_features
        expected = {f"{name}.weight_int8": ((out_f, in_f), torch.int8), f"{name}.weight_scale": ((out_f,), torch.float32),
                    f"{name}.weight_zero_point": ((out_f,), torch.int64)}
        if layer.bias() is not None:
            expected[f"{name}.bias"] = ((out_f,), torch.float32)
        for key, (shape, dtype) in expected.items():
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                found = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ArtifactError(f"int8 tensor {key!r} is {found}; expected {shape} {dtype}")
        scale = tensors.pop(f"{name}.weight_scale")
        if not bool((scale > 0).all()):
            raise ArtifactError(f"int8 tensor '{name}.weight_scale' has non-positive scales")
        weight = torch._make_per_channel_quantized_tensor(tensors.pop(f"{name}.weight_int8"), scale.double(),
                                                          tensors.pop(f"{name}.weight_zero_point"), 0)
        layer.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))


# --- prune ------------------------------------------------------------------------------------------


def _final_layer(backbone, x: torch.Tensor, width: int):
    """The last conv/linear layer run whose output width is the branch's feature width (kept intact)."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((mod, out)))
             for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
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
        pruner = tp.pruner.MetaPruner(backbone, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
        pruner.step()
        with torch.no_grad():
            out = branch(x)
    except Exception as e:  # a backbone whose graph torch-pruning cannot follow
        raise ConfigError(f"branch '{branch.name}': structured pruning failed ({type(e).__name__}: {e}); "
                          "this backbone cannot be pruned (the in-memory model is now unusable)") from e
    finally:
        if branch.frozen:
            backbone.requires_grad_(False)
    if out.dim() != 2 or out.shape[1] != width:
        raise ConfigError(f"branch '{branch.name}': pruning changed its output from width {width} to "
                          f"{tuple(out.shape)}; this backbone cannot be pruned")


def _module_record(module) -> dict:
    attrs = {}
    for a in SHAPE_ATTRS:
        value = getattr(module, a, None)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[a] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            attrs[a] = list(value)
    names = set(module.state_dict(keep_vars=True).keys())
    tensors = {n: list(t.shape) for n, t in [*module._parameters.items(), *module._buffers.items()]
               if t is not None and n in names}
    return {"type": type(module).__name__, "attrs": attrs, "tensors": tensors}


def count_macs(model) -> tuple[int, int]:
    """(multiply-accumulates per image, parameters) of the whole fused model, at its largest input size."""
    import torch_pruning as tp

    from .features import input_size_for

    channels = max(b.backbone.data_config["input_size"][0] for b in model.branches)
    x = torch.rand(1, channels, *input_size_for(model))
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, x)
    model.train(was_training)
    return int(macs), int(params)


def prune(model, *, ratio: float = 0.3, train=None, epochs: int = 1, lr: float = 3e-4, batch_size: int = 32,
          seed: int = 0, round_to: int | None = None, device: str = "cpu", log=print, progress: bool = True) -> dict:
    """Remove ``ratio`` of each backbone's prunable channels, then fine-tune on ``train`` for ``epochs``."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        raise ConfigError("pruning needs the torch-pruning package: pip install 'fusion-engine[compress]' "
                          "(or pip install torch-pruning)") from None
    _check_order(model, "prune")
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
    info = {"ratio": ratio, "importance": "L2 magnitude, per layer (torch-pruning MetaPruner)", "round_to": round_to,
            "macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
            "params_after": params_after}
    if train is not None:
        info["recovery"] = recover(model, teacher, train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                   device=device, log=log, progress=progress)
    step = {"method": "prune", "pruned": {name: _module_record(model.get_submodule(name)) for name in changed},
            "info": info}
    _append(model, step)
    return step


def _reshape(model, pruned: dict) -> None:
    """Resize the layers named in a prune step to the recorded shapes (values come from the tensors)."""
    for name, record in pruned.items():
        kind, attrs, tensors = _get(record, "type"), _get(record, "attrs"), _get(record, "tensors")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the manifest's pruned layer {name!r} is not in the rebuilt model") from None
        if type(module).__name__ != kind:
            raise ArtifactError(f"pruned layer {name!r} is a {type(module).__name__} in the rebuilt model, "
                                f"the manifest says {kind}")
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
                raise ArtifactError(f"pruned tensor '{name}.{tensor_name}': shape {shape} is not a pruning of "
                                    f"{list(old.shape)}")
            new = torch.empty(shape, dtype=old.dtype)
            table[tensor_name] = nn.Parameter(new, requires_grad=old.requires_grad) if table is module._parameters else new


# --- recovery fine-tune -----------------------------------------------------------------------------


def recover(model, teacher, train, *, epochs: int = 1, lr: float = 3e-4, batch_size: int = 32, seed: int = 0,
            temperature: float = 2.0, calibration_batches: int = 50, device: str = "cpu", log=print,
            progress: bool = True) -> dict:
    """Recover accuracy after pruning: re-estimate the backbones' batch-norm statistics on up to
    ``calibration_batches`` batches of ``train``, then fine-tune the whole model for ``epochs`` with
    those statistics fixed, on cross-entropy plus distillation from ``teacher`` (the unpruned model)."""
    from .data import load_dataset
    from .evaluation import align_classes
    from .features import make_loader
    from .progress import Progress

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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.to(device)
    teacher.to(device)
    norms = list({id(m): m for b in model.branches for m in b.backbone.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)}.values())
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
                loss = 0.5 * F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5 * temperature ** 2 * distill
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
    return {"epochs": history, "n_train": len(dataset), "lr": lr, "batch_size": batch_size,
            "seconds": round(time.perf_counter() - start, 1), "batch_norm_recalibrated_on": calibrated,
            "loss": "0.5 CE(label smoothing 0.1) + 0.5 T^2 KL, T=2"}


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


# --- saving and loading -------------------------------------------------------------------------------


def pack_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors save() writes for a compressed model: int8 layers unpacked, float16 where asked."""
    step_list = steps(model)
    quantized = _quantized(step_list)
    prefixes = tuple(n + "." for n in quantized)
    out = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
           if not (prefixes and k.startswith(prefixes))}
    _pack_int8(model, quantized, out)
    if any(s["method"] == "fp16" for s in step_list):
        out = {k: v.half() if _fits_fp16(v) and not (prefixes and k.startswith(prefixes)) else v
               for k, v in out.items()}  # int8 layers keep their float32 scales and biases
    return out


def restore(model, tensors: dict[str, torch.Tensor], step_list) -> None:
    """Replay the manifest's compression steps on a freshly built model, then load ``tensors`` into it."""
    from .artifacts import _load_state
    from .engine import measure_feature_dims

    methods = [_get(s, "method") for s in step_list]
    if len(set(methods)) != len(methods) or methods != sorted(methods, key=METHODS.index):
        raise ArtifactError(f"the manifest's compression steps {methods} are not in the order {' -> '.join(METHODS)}")
    tensors = dict(tensors)
    widths = [b.feature_dim for b in model.branches]
    for step in step_list:
        if _get(step, "method") == "prune":
            _reshape(model, _get(step, "pruned"))
            model.baselines = None
    quantized = _quantized(step_list)
    with _quiet_torch_ao():
        _swap_in_quantized(model, quantized)
        _unpack_int8(model, quantized, tensors)
    if "fp16" in methods:
        own = model.state_dict()
        tensors = {k: v.float() if v.dtype == torch.float16 and k in own and own[k].dtype == torch.float32 else v
                   for k, v in tensors.items()}
    _load_state(model, tensors, skip=tuple(n + "." for n in quantized))
    if "prune" in methods:
        try:
            measured = measure_feature_dims(model)
        except Exception as e:
            raise ArtifactError(f"the pruned model recorded in the manifest does not run: {type(e).__name__}: {e}") from None
        if measured != widths:
            raise ArtifactError(f"the pruned model's branch widths {measured} differ from the manifest's {widths}")


# --- measuring --------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(model, data, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (no feature cache: works for every compressed form)."""
    from .data import load_dataset
    from .evaluation import align_classes
    from .features import make_loader

    dataset = align_classes(model, load_dataset(data))
    model.eval()
    correct = 0
    for images, labels in make_loader(dataset, model, batch_size):
        correct += int((model(images).argmax(1) == labels).sum())
    return correct / len(dataset)


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def compress(model, methods, *, train=None, ratio: float = 0.3, epochs: int = 1, lr: float = 3e-4,
             batch_size: int = 32, seed: int = 0, round_to: int | None = None, device: str = "cpu", log=print,
             progress: bool = True) -> list[dict]:
    """Apply ``methods`` (names in any order; applied prune -> int8 -> fp16) to ``model`` in place."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown compression method {m!r}; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"compression methods repeat: {methods}")
    done = []
    for method in sorted(methods, key=METHODS.index):
        if method == "prune":
            done.append(prune(model, ratio=ratio, train=train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                              round_to=round_to, device=device, log=log, progress=progress))
        elif method == "int8":
            done.append(quantize_int8(model))
        else:
            done.append(to_fp16(model))
    return done


# --- command line -------------------------------------------------------------------------------------


def cmd_compress(args) -> int:
    """``fusion-engine compress RUN_DIR --out DIR --method ...``"""
    from .artifacts import load, save
    from .data import load_dataset, stratified_split
    from .encryption import load_key

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    source = load(args.run_dir, public_key=args.public_key,
                  encryption_key=load_key(args.key_file) if args.key_file else None)
    encrypted = source.extras["manifest"].encrypted or args.encrypt
    key = load_key(args.key_file) if encrypted else None
    methods = [m.strip() for chunk in args.method for m in chunk.split(",") if m.strip()]
    train = test = None
    if args.data:
        data = load_dataset(args.data)
        if args.data_test:
            train, test = data, load_dataset(args.data_test)
        else:
            train, test = stratified_split(data, args.test_fraction, args.seed)
    elif "prune" in methods and not args.no_recovery:
        raise ConfigError("prune needs --data for its recovery fine-tune (or --no-recovery to skip it)")
    acc_before = accuracy(source, test) if test is not None else None
    step_list = compress(source, methods, train=None if args.no_recovery else train, ratio=args.ratio,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         round_to=args.round_to, log=log, progress=not args.quiet and not args.json)
    result = {"methods": [s["method"] for s in step_list]}
    for s in step_list:
        if s["method"] == "prune":
            result.update({k: s["info"][k] for k in ("macs_before", "macs_after", "params_before", "params_after")})
    if test is not None:
        result.update(held_out=len(test), accuracy_before=acc_before, accuracy_after=accuracy(source, test))
    # the source's test metrics describe the uncompressed model: kept, but under their own name
    metrics = {"compression": {"source": str(args.run_dir), **result},
               "source_metrics": source.extras.get("metrics", {})}
    out = save(source, args.out, encryption_key=key, signing_key=args.sign_key, metrics=metrics)
    result = {"run_dir": str(out), **result, "bytes_before": folder_bytes(args.run_dir), "bytes_after": folder_bytes(out)}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            log(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def add_compress_parser(sub) -> argparse.ArgumentParser:
    """Add ``compress`` to the CLI's subparsers."""
    p = sub.add_parser("compress", help="fp16 storage, int8 linear layers, structured channel pruning")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="RUN_DIR to write the compressed model to")
    p.add_argument("--method", action="append", required=True,
                   help=f"one of {', '.join(METHODS)}; repeat or comma-separate to combine (applied prune -> int8 -> fp16)")
    p.add_argument("--ratio", type=float, default=0.3, help="prune: share of each prunable layer's channels removed")
    p.add_argument("--round-to", type=int, help="prune: keep channel counts multiples of this")
    p.add_argument("--data", help="training data for prune's recovery fine-tune; with it, held-out accuracy "
                                  "before/after is reported (same split as train: --test-fraction, --seed)")
    p.add_argument("--data-test", help="held-out data; then all of --data is used for the fine-tune")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1, help="prune: recovery fine-tune epochs")
    p.add_argument("--lr", type=float, default=3e-4, help="prune: recovery learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-recovery", action="store_true", help="prune without the recovery fine-tune")
    p.add_argument("--public-key", help="refuse RUN_DIR unless signed by this Ed25519 public key")
    p.add_argument("--key-file", help="key of an encrypted RUN_DIR (else FUSION_ENGINE_KEY); the output is "
                                      "encrypted with it too")
    p.add_argument("--encrypt", action="store_true", help="encrypt the output even if RUN_DIR is not encrypted")
    p.add_argument("--sign-key", help="Ed25519 private key: sign the compressed model")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)
    return p


__all__ = ["METHODS", "compress", "prune", "quantize_int8", "to_fp16", "recover", "accuracy", "pack_tensors",
           "restore", "add_compress_parser", "cmd_compress"]
