"""What the search chooses from: candidate backbones (with their features) and fusion settings.

- :func:`load_candidates` reads the candidate backbones (a file, a list, a dict, or the local
  weights index) and :func:`normalise_grid` the fusion settings to try (:data:`DEFAULT_GRID`);
- :func:`extract_candidates` builds a one-branch model per backbone and gets its features
  through the feature cache, with its extraction rate (:class:`Candidate`);
- :func:`baseline_features` gives the handcrafted features of the leaderboard's baseline row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_engine.core.config import load_config_file, parse_config
from fusion_engine.core.data import collate_images
from fusion_engine.core.handcrafted import handcrafted_features
from fusion_engine.core.probes import HANDCRAFTED_KINDS
from fusion_engine.core.weights_index import ENV_VAR, all_entries
from fusion_engine.errors import ConfigError, FusionEngineError
from fusion_engine.training.baselines import handcrafted_for
from fusion_engine.training.feature_cache import FeatureCache

# A small option grid per fusion; a fusion not named here is tried with its defaults.
DEFAULT_GRID: dict[str, list[dict]] = {
    "concat": [{}, {"hidden": 512}],
    "stacking": [{}, {"C": 0.1}],
}
SCREEN_FUSION = {"name": "concat"}  # cheap and faithful to "how much does this backbone add"


@dataclass
class Candidate:
    """One candidate backbone with its features on the training data (fit's split order)."""

    label: str
    spec: Any
    dim: int
    parameters: int
    images_per_second: float | None
    extract_seconds: float
    cached: bool
    features: np.ndarray = field(repr=False)
    model: Any = field(default=None, repr=False)


# ---------------------------------------------------------------------------- backbones and fusion grids


def load_candidates(source=None, index_extras=()) -> tuple[list, dict[str, list[dict]] | None]:
    """``(backbone specs, fusion grid or None)`` from a candidates file, a list, a dict, or None.

    A file (JSON or YAML) holds a list of backbone specs, or ``{"backbones": [...],
    "fusions": ...}`` where ``fusions`` is a list of names or a dict name -> list of option
    dicts. ``None`` (or no ``backbones`` key): every entry of the weights index (``--weights-dir`` /
    ``FUSION_ENGINE_WEIGHTS_DIR``, then installed weights packages), as ``{"name": "timm", "weights": NAME}``,
    followed by ``index_extras``.
    """
    if isinstance(source, (str, Path)):
        source = load_config_file(source)
    fusions = None
    if isinstance(source, dict):
        unknown = set(source) - {"backbones", "fusions"}
        if unknown:
            raise ConfigError(f"candidates: unknown key(s) {sorted(unknown)}; valid keys: backbones, fusions")
        fusions = normalise_grid(source.get("fusions"))
        source = source.get("backbones")
    if source is None:
        source = [{"name": "timm", "weights": name} for name in all_entries()]
        if not source:
            raise ConfigError(
                f"no candidate backbones: give a candidates file (--candidates) or a weights folder "
                f"with an index.json (--weights-dir / {ENV_VAR}), or install a weights package "
                "(pip install ./plugins/fusion-engine-weights)"
            )
        source += list(index_extras)
    if not isinstance(source, list) or not source:
        raise ConfigError("candidates: 'backbones' must be a non-empty list of backbone specs")
    return list(source), fusions


def normalise_grid(fusions) -> dict[str, list[dict]] | None:
    """A list of names (or ``{"name": ..., **options}``) or a dict name -> [options] -> dict name -> [options]."""
    if fusions is None:
        return None
    if isinstance(fusions, str):
        fusions = [fusions]
    if isinstance(fusions, list):
        grid: dict[str, list[dict]] = {}
        for item in fusions:
            if isinstance(item, str):
                grid.setdefault(item, []).extend(DEFAULT_GRID.get(item, [{}]))
            elif isinstance(item, dict) and "name" in item:
                grid.setdefault(item["name"], []).append({k: v for k, v in item.items() if k != "name"})
            else:
                raise ConfigError(f"candidates: a fusion is a name or {{'name': ..., options}}, got {item!r}")
        return grid
    if isinstance(fusions, dict):
        out = {}
        for name, options in fusions.items():
            options = [{}] if options in (None, [], {}) else options
            options = [options] if isinstance(options, dict) else options
            if not isinstance(options, list) or not all(isinstance(o, dict) for o in options):
                raise ConfigError(f"candidates: fusions.{name} must be a list of option dicts, got {options!r}")
            out[name] = options
        return out
    raise ConfigError(f"candidates: 'fusions' must be a list or a dict, got {type(fusions).__name__}")


def fusion_label(name: str, options: dict) -> str:
    """``name(key=value, ...)``, options sorted; the bare name without options."""
    return name + (f"({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")


def setting_label(fusion: dict) -> str:
    """:func:`fusion_label` of a fusion setting ``{"name": ..., **options}``."""
    return fusion_label(fusion["name"], {k: v for k, v in fusion.items() if k != "name"})


# ---------------------------------------------------------------------------- extraction


def _throughput(model, dataset, n: int, batch_size: int, device, runtime: str = "torch") -> float:
    """Images per second of extraction on the first ``n`` images: the FeatureCache path with
    ``runtime`` (as an uncached candidate is timed), after a one-image warm-up, nothing stored."""
    subset = dataset.subset(np.arange(min(n, len(dataset))))
    probe = FeatureCache(enabled=False, runtime=runtime)
    probe.features(model, subset.subset([0]), batch_size=batch_size, device=device, progress=False)  # warm-up
    start = time.perf_counter()
    probe.features(model, subset, batch_size=batch_size, device=device, progress=False)
    return len(subset) / max(time.perf_counter() - start, 1e-9)


def extract_candidates(
    engine,
    specs: list,
    parts: list,
    class_names,
    cache,
    *,
    batch_size: int,
    device,
    throughput_images: int,
    num_workers: int = 0,
    progress: bool = False,
    log=print,
    seed: int = 0,
) -> tuple[list[Candidate], list[dict]]:
    """Build a one-branch model per spec and get its features on every part through ``cache``.

    Returns ``(candidates, skipped)``; a spec that cannot be built is skipped with its error.
    """
    candidates, skipped, labels = [], [], set()
    for spec in specs:
        try:
            parsed = parse_config({"backbones": [spec]})
            label = parsed.branch_names()[0]
        except FusionEngineError as exc:
            skipped.append({"candidate": str(spec), "error": str(exc)})
            continue
        base, n = label, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.add(label)
        if isinstance(spec, dict) and not spec.get("label"):
            # an explicit label keeps the branch name when the saved model is rebuilt without its weights options
            spec = {**spec, "label": label}
        try:
            torch.manual_seed(seed)
            model = engine.build({"backbones": [spec], "fusion": "concat"}, class_names=class_names)
        except (FusionEngineError, RuntimeError, TypeError, ValueError) as exc:
            skipped.append({"candidate": label, "error": f"{type(exc).__name__}: {exc}"})
            log(f"  {label}: cannot be built, skipped ({exc})")
            continue
        before = dict(cache.stats)
        start = time.perf_counter()
        model.to(device)
        try:
            feats = [
                np.asarray(
                    cache.features(
                        model, part, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress
                    )[0],
                    dtype=np.float32,
                )
                for part in parts
            ]
        except (FusionEngineError, RuntimeError, TypeError, ValueError) as exc:
            model.to("cpu")
            skipped.append({"candidate": label, "error": f"feature extraction failed: {type(exc).__name__}: {exc}"})
            log(f"  {label}: feature extraction failed, skipped ({exc})")
            continue
        seconds = time.perf_counter() - start
        extracted = cache.stats["extracted"] - before["extracted"]
        if extracted:
            n_images = sum(len(p) for p in parts)  # a partly cached candidate: an estimate, rate of the pass
            rate = n_images / max(cache.stats["extract_seconds"] - before["extract_seconds"], 1e-9)
        else:
            rate = _throughput(model, parts[0], throughput_images, batch_size, device, cache.runtime)
        model.to("cpu")
        candidates.append(
            Candidate(
                label=label,
                spec=spec,
                dim=int(model.branches[0].feature_dim),
                parameters=sum(p.numel() for p in model.branches[0].parameters()),
                images_per_second=round(rate, 2),
                extract_seconds=round(seconds, 3),
                cached=not extracted,
                features=np.concatenate(feats),
                model=model,
            )
        )
        how = "cached" if not extracted else f"extracted in {seconds:.1f} s"
        log(f"  {label}: {candidates[-1].dim} features, {how}, {rate:.1f} images/s")
    return candidates, skipped


def baseline_features(parts, cache) -> tuple[np.ndarray, float]:
    """Handcrafted features of the parts (through the cache) and their extraction rate (images/s):
    the leaderboard's baseline row, not a candidate."""
    feats = np.concatenate([np.asarray(handcrafted_for(p, cache), dtype=np.float32) for p in parts])
    sample = parts[0].subset(np.arange(min(64, len(parts[0]))))
    images, _ = collate_images([sample[i] for i in range(len(sample))], size=(64, 64))
    start = time.perf_counter()
    with torch.inference_mode():
        handcrafted_features(images, kinds=HANDCRAFTED_KINDS)
    return feats, round(len(sample) / max(time.perf_counter() - start, 1e-9), 2)
