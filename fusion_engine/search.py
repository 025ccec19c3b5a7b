"""Let the data choose: backbones and fusion selected by cross-validation on cached features.

``fusion-engine train --search`` and :func:`search` extract every candidate backbone once
(through the feature cache), then, on the training data only:

1. score every candidate backbone alone (stratified k-fold CV, the *screening* fusion:
   ``concat``, a linear head on normalised features);
2. greedy forward selection: the best subset so far is extended by the backbone whose
   addition scores best under the screening fusion; every candidate fusion (every
   registered fusion, plugins included, with a small option grid each) is then scored on
   the extended subset; the extension is kept only when its best row beats the previous
   best row by more than the fold noise (the standard error of the paired per-fold
   differences), else the search stops;
3. the winner is the best row of the last accepted subset; the held-out data, when given,
   is read only after that choice, to score every row for the report (each row refitted on
   the training data as ``fit()`` would train it).

Each CV fold trains a head as ``fit()`` does (gradient fusions: early stopping on a split of
the fold's training rows; fitted fusions such as stacking: ``fusion.fit``), with a modest
epoch count. The time budget covers the selection (not extraction, not the report): a row
starts only when its estimated time fits in what is left, a fold only when its estimate
fits, so the selection ends at most one fold past the budget; the first row always runs.

Features are the same arrays ``fit()`` uses: the training data is split (stratified, seeded,
``val_fraction``) exactly as ``fit()`` splits it, so training the winner afterwards hits the
cache, and so does a search over a cache a normal training run filled.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, DataError, FusionEngineError

# A small option grid per fusion; a fusion not named here is tried with its defaults.
DEFAULT_GRID: dict[str, list[dict]] = {
    "concat": [{}, {"hidden": 512}],
    "stacking": [{}, {"C": 0.1}],
}
SCREEN_FUSION = {"name": "concat"}  # cheap and faithful to "how much does this backbone add"
RANK_TOP = 5  # the leaderboard's CV order is checked against the held-out order for this many rows


class SearchConfig(BaseModel):
    """Options of the search (the ``--search`` flags of ``fusion-engine train``)."""

    model_config = ConfigDict(extra="forbid")
    folds: int = Field(default=5, ge=2, description="stratified cross-validation folds")
    max_branches: int = Field(default=3, ge=1, description="largest backbone subset tried")
    time_budget: float | None = Field(default=None, gt=0, description="minutes for the selection after extraction")
    epochs: int | None = Field(default=None, ge=1, description=(
        "head epochs per CV fold (gradient fusions); default: enough for about 300 optimizer steps, "
        "at least 10 and at most the final training's epochs"))
    patience: int = Field(default=5, ge=1, description="early-stopping patience per CV fold")
    min_gain: float = Field(default=0.0, ge=0, description="a larger subset must also gain this much CV accuracy")
    prefer_fewer: bool = Field(default=True, description=(
        "winner: the best row of the last accepted subset (True), or the best CV row of all, even one of a "
        "larger subset whose gain was within the fold noise (False)"))
    fusions: dict[str, list[dict]] | None = Field(
        default=None, description="fusion name -> option sets to try (default: every registered fusion, DEFAULT_GRID)")
    screen: str | dict | None = Field(default=None, description=(
        "fusion that scores each single backbone and each possible addition (default: concat)"))
    baseline: bool = Field(default=True, description="handcrafted-features row in the leaderboard")
    held_out: bool = Field(default=True, description="score every row on the test data after the choice")
    throughput_images: int = Field(default=64, ge=1, description="images timed per backbone when features are cached")


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


class BudgetExhausted(Exception):
    pass


# ---------------------------------------------------------------------------- candidates


def load_candidates(source=None, index_extras=()) -> tuple[list, dict[str, list[dict]] | None]:
    """``(backbone specs, fusion grid or None)`` from a candidates file, a list, a dict, or None.

    A file (JSON or YAML) holds a list of backbone specs, or ``{"backbones": [...],
    "fusions": ...}`` where ``fusions`` is a list of names or a dict name -> list of option
    dicts. ``None`` (or no ``backbones`` key): every entry of the local weights index
    (``--weights-dir`` / ``FUSION_ENGINE_WEIGHTS_DIR``), as ``{"name": "timm", "weights": NAME}``,
    followed by ``index_extras``.
    """
    if isinstance(source, (str, Path)):
        from .config import load_config_file

        source = load_config_file(source)
    fusions = None
    if isinstance(source, dict):
        unknown = set(source) - {"backbones", "fusions"}
        if unknown:
            raise ConfigError(f"candidates: unknown key(s) {sorted(unknown)}; valid keys: backbones, fusions")
        fusions = normalise_grid(source.get("fusions"))
        source = source.get("backbones")
    if source is None:
        from .weights_index import ENV_VAR, all_entries

        source = [{"name": "timm", "weights": name} for name in all_entries()]
        if not source:
            raise ConfigError(f"no candidate backbones: give a candidates file (--candidates) or a weights folder "
                              f"with an index.json (--weights-dir / {ENV_VAR})")
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
    return name + (f"({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")


# ---------------------------------------------------------------------------- the search


class _Clock:
    def __init__(self, budget_seconds: float | None):
        self.start = time.perf_counter()
        self.budget = budget_seconds
        self.exhausted = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: float) -> bool:
        if self.budget is None:
            return True
        ok = self.elapsed + estimate <= self.budget
        self.exhausted |= not ok
        return ok


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def _inner_split(idx: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (fit, early-stopping) parts, stratified when every class allows it."""
    from sklearn.model_selection import train_test_split

    try:
        fit, stop = train_test_split(idx, test_size=fraction, stratify=y[idx], random_state=seed)
    except ValueError:
        fit, stop = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(fit), np.sort(stop)


class Searcher:
    """Holds the candidates' features, the folds and every scored row; see :func:`search`."""

    def __init__(self, engine, candidates: list[Candidate], y: np.ndarray, n_fit: int, num_classes: int,
                 config: SearchConfig, train_config, device, log, hand: np.ndarray | None = None):
        from sklearn.model_selection import StratifiedKFold

        self.engine, self.candidates, self.y, self.n_fit = engine, candidates, y, n_fit
        self.num_classes, self.config, self.train_config = num_classes, config, train_config
        self.device, self.log = device, log
        self.hand = hand
        folds = min(config.folds, int(np.bincount(y, minlength=num_classes)[np.unique(y)].min()))
        if folds < 2:
            raise DataError("the search needs at least two training images of every class for cross-validation")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=train_config.seed)
        self.folds = list(splitter.split(np.zeros(len(y)), y))
        epochs = config.epochs
        if epochs is None:
            rows = len(y) * (folds - 1) / folds * (1 - train_config.val_fraction)
            steps = max(1, math.ceil(rows / train_config.head_batch_size))
            epochs = min(train_config.epochs, max(10, math.ceil(300 / steps)))
        self.cv_config = train_config.model_copy(update={"epochs": epochs, "patience": min(config.patience, epochs)})
        self.rows: dict[tuple, dict] = {}
        self.fold_seconds: dict[str, tuple[float, int]] = {}  # fusion label -> (seconds per fold, width)
        self.clock = _Clock(config.time_budget * 60 if config.time_budget else None)
        self.longest_fold = 0.0
        self.fold_seconds_by_name: dict[str, tuple[float, int]] = {}
        self.skipped_for_budget: list[str] = []
        self.mandatory = True  # the first evaluation always completes: a search must return something
        self.hand_rate: float | None = None

    # -- one fusion on a subset of backbones, trained on some rows and scored on others

    def make_head(self, fusion: dict, in_dims: list[int]):
        from .training import seed_everything

        name, options = fusion["name"], {k: v for k, v in fusion.items() if k != "name"}
        component = self.engine.registry.get("fusion", name)
        options = component.validate_options(options, f"fusion {fusion_label(name, options)}")
        seed_everything(self.train_config.seed)
        return component.factory(list(in_dims), self.num_classes, **options)

    def fit_head(self, fusion: dict, feats: list[np.ndarray], fit_idx, stop_idx, config):
        """A head trained as fit() trains one: a fitted fusion (stacking) on ``fit_idx``; a gradient
        fusion on ``fit_idx`` with early stopping on ``stop_idx``."""
        from .training import train_head

        head = self.make_head(fusion, [f.shape[1] for f in feats])
        y = self.y
        if getattr(head, "requires_fit", False):
            head.fit([f[fit_idx] for f in feats], y[fit_idx])
        else:
            train_head(head, [f[fit_idx] for f in feats], y[fit_idx], [f[stop_idx] for f in feats], y[stop_idx],
                       config, self.device, log=lambda *a, **k: None)
        return head

    def score_folds(self, subset: tuple[int, ...], fusion: dict) -> tuple[list[float], int]:
        """Per-fold accuracies of ``fusion`` on ``subset``; each fold trains on its training rows
        (split once more for early stopping, as fit() splits) and scores its held rows."""
        from .evaluation import logits_from_features

        feats = [self.candidates[i].features for i in subset]
        width = sum(f.shape[1] for f in feats)
        key = fusion_label(fusion["name"], {k: v for k, v in fusion.items() if k != "name"})
        scores, head_params = [], 0
        for train_idx, held_idx in self.folds:
            if not self.mandatory and not self.clock.allows(self._estimate(fusion, width)):
                raise BudgetExhausted  # the estimate before the row was wrong: drop the row, stop the search
            start = time.perf_counter()
            fit_idx, stop_idx = _inner_split(train_idx, self.y, self.train_config.val_fraction, self.train_config.seed)
            head = self.fit_head(fusion, feats, fit_idx, stop_idx, self.cv_config)
            scores.append(_accuracy(logits_from_features(head, [f[held_idx] for f in feats], device=self.device),
                                    self.y[held_idx]))
            head_params = sum(p.numel() for p in head.parameters())
            self.fold_seconds[key] = self.fold_seconds_by_name[fusion["name"]] = (time.perf_counter() - start, width)
            self.longest_fold = max(self.longest_fold, self.fold_seconds[key][0])
        return scores, head_params

    # -- rows of the leaderboard

    def _estimate(self, fusion: dict, width: int) -> float:
        """Seconds one fold of ``fusion`` should take at this feature width: the last fold of the same
        settings, else of the same fusion, scaled up by width; else the others' mean per feature; else 0."""
        key = fusion_label(fusion["name"], {k: v for k, v in fusion.items() if k != "name"})
        seen = self.fold_seconds.get(key) or self.fold_seconds_by_name.get(fusion["name"])
        if seen:
            seconds, seen_width = seen
            return seconds * max(width / max(seen_width, 1), 1.0)
        if self.fold_seconds:
            return float(np.mean([s / max(w, 1) for s, w in self.fold_seconds.values()])) * width
        return 0.0

    def _row(self, subset: tuple[int, ...], fusion: dict, step: int) -> dict:
        members = [self.candidates[i] for i in subset]
        rates = [c.images_per_second for c in members]
        return {
            "candidate": f"{fusion_label(fusion['name'], {k: v for k, v in fusion.items() if k != 'name'})} "
                         f"[{' + '.join(c.label for c in members)}]",
            "kind": "single" if len(subset) == 1 else "fused",
            "backbones": [c.label for c in members], "subset": list(subset), "fusion": dict(fusion),
            "cv_mean": None, "cv_std": None, "cv_folds": None, "held_out": None,
            "feature_width": sum(c.dim for c in members),
            "images_per_second": round(1.0 / sum(1.0 / r for r in rates), 2) if all(rates) else None,
            "parameters": sum(c.parameters for c in members), "step": step, "seconds": None,
        }

    def evaluate(self, subset: tuple[int, ...], fusion: dict, step: int) -> dict:
        """Score ``fusion`` on ``subset`` by CV (once; later calls return the same row).

        A row whose estimated time (folds x the estimated fold) does not fit in what is left of the
        budget is not scored (returned without ``cv_mean``, not kept); if a fold then does not fit
        after all, BudgetExhausted is raised and the partly scored row dropped. The very first
        evaluation always completes: a search must return something.
        """
        key = (subset, json.dumps(fusion, sort_keys=True, default=str))
        if key in self.rows:
            return self.rows[key]
        row = self._row(subset, fusion, step)
        estimate = len(self.folds) * self._estimate(fusion, row["feature_width"])
        if not self.mandatory and not self.clock.allows(estimate):
            row["error"] = f"not scored: about {estimate:.0f} s would exceed the time budget"
            self.skipped_for_budget.append(row["candidate"])
            return row
        start = time.perf_counter()
        try:
            scores, head_params = self.score_folds(subset, fusion)
        except BudgetExhausted:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin fusion that fails is a row with an error, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"
            self.rows[key] = row
            self.log(f"  {row['candidate']}: failed: {row['error']}")
            return row
        self.mandatory = False
        row.update(cv_mean=float(np.mean(scores)), cv_std=float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                   cv_folds=[round(s, 6) for s in scores], seconds=round(time.perf_counter() - start, 3))
        row["parameters"] += head_params
        self.rows[key] = row
        self.log(f"  [{self.clock.elapsed:6.1f} s] {row['candidate']}: CV {row['cv_mean']:.4f} ± {row['cv_std']:.4f}")
        return row

    def baseline_row(self) -> dict | None:
        """Handcrafted features (HOG + colour histogram) with a tuned logistic regression."""
        from .baselines import fit_tuned
        from .linear_probe import LinearProbe

        if self.hand is None:
            return None
        row = {"candidate": "handcrafted: HOG + colour histogram + logistic regression", "kind": "baseline",
               "backbones": [], "subset": [], "fusion": None, "cv_mean": None, "cv_std": None, "cv_folds": None,
               "held_out": None, "feature_width": int(self.hand.shape[1]), "images_per_second": self.hand_rate,
               "parameters": 0, "step": 0, "seconds": None}
        start, scores = time.perf_counter(), []
        for train_idx, held_idx in self.folds:
            fit_idx, stop_idx = _inner_split(train_idx, self.y, self.train_config.val_fraction, self.train_config.seed)
            probe = LinearProbe(self.hand.shape[1], self.num_classes)
            fit_tuned(probe, self.hand[fit_idx], self.y[fit_idx], self.hand[stop_idx], self.y[stop_idx],
                      self.train_config.seed)
            scores.append(_accuracy(probe.predict_proba(self.hand[held_idx]), self.y[held_idx]))
        row["parameters"] = sum(p.numel() for p in probe.parameters())
        row.update(cv_mean=float(np.mean(scores)), cv_std=float(np.std(scores, ddof=1)), cv_folds=scores,
                   seconds=round(time.perf_counter() - start, 3))
        self.rows[("baseline",)] = row
        self.log(f"  {row['candidate']}: CV {row['cv_mean']:.4f} ± {row['cv_std']:.4f}")
        return row

    # -- greedy forward selection

    def run(self, fusions: list[dict], screen: dict) -> dict:
        """The selection; returns ``{"winner": row, "steps": [...], "stopped": reason}``."""
        steps, best_row, current, stopped = [], None, (), None
        n = len(self.candidates)
        for size in range(1, min(self.config.max_branches, n) + 1):
            budget_hit, screened = False, []
            try:
                if size == 1:
                    for i in range(n):
                        screened.append(self.evaluate((i,), screen, 1))
                else:
                    for i in range(n):
                        if i not in current:
                            screened.append(self.evaluate(tuple(sorted(current + (i,))), screen, size))
            except BudgetExhausted:
                budget_hit = True
            screened = [r for r in screened if r["cv_mean"] is not None]
            if not screened:
                stopped = "time budget reached" if budget_hit or self.clock.exhausted else "no candidate could be scored"
                break
            pick = max(screened, key=lambda r: (r["cv_mean"], -r["parameters"]))
            subset = tuple(pick["subset"])
            rows = [pick]
            if not budget_hit:
                try:
                    for fusion in fusions:
                        rows.append(self.evaluate(subset, fusion, size))
                except BudgetExhausted:
                    budget_hit = True
            best = max((r for r in rows if r["cv_mean"] is not None), key=lambda r: (r["cv_mean"], -r["parameters"]))
            step = {"size": size, "subset": [self.candidates[i].label for i in subset], "best": best["candidate"],
                    "cv_mean": best["cv_mean"],
                    "fusions_scored": len({r["candidate"] for r in rows if r["cv_mean"] is not None})}
            if best_row is None:
                step["accepted"] = True
            else:
                diffs = np.asarray(best["cv_folds"]) - np.asarray(best_row["cv_folds"])
                gain = float(diffs.mean())
                noise = float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
                step.update(gain=round(gain, 6), noise=round(noise, 6),
                            accepted=bool(gain > max(noise, self.config.min_gain)))
            steps.append(step)
            if not step["accepted"] and (budget_hit or self.clock.exhausted):
                step["complete"] = False
                stopped = (f"time budget reached while scoring subsets of {size} backbones "
                           f"({step['fusions_scored']} of {len(fusions) + 1} fusion settings scored)")
                break
            if not step["accepted"]:
                added = self.candidates[(set(subset) - set(current)).pop()].label
                stopped = (f"adding {added} gained {100 * step['gain']:+.2f} points, not more than the fold noise "
                           f"({100 * step['noise']:.2f}" + (f", min_gain {100 * self.config.min_gain:.2f}"
                                                            if self.config.min_gain else "") + ")")
                break
            best_row, current = best, subset
            if budget_hit or self.clock.exhausted:
                stopped = "time budget reached"
                break
        if stopped is None:
            stopped = "max_branches reached" if len(current) == self.config.max_branches else "every candidate used"
        if best_row is not None and not self.config.prefer_fewer:
            best_row = max((r for r in self.rows.values() if r["cv_mean"] is not None),
                           key=lambda r: (r["cv_mean"], -r["parameters"]))
        for i, c in enumerate(self.candidates):  # every single backbone is a row, scored or not
            key = ((i,), json.dumps(screen, sort_keys=True, default=str))
            if key not in self.rows:
                self.rows[key] = self._row((i,), screen, 1)
                self.rows[key]["error"] = "not scored: time budget reached"
        return {"winner": best_row, "steps": steps, "stopped": stopped}


# ---------------------------------------------------------------------------- extraction


def _throughput(model, dataset, n: int, batch_size: int, device, runtime: str = "torch") -> float:
    """Images per second of extraction on the first ``n`` images: the FeatureCache path with
    ``runtime`` (as an uncached candidate is timed), after a one-image warm-up, nothing stored."""
    from .features import FeatureCache

    subset = dataset.subset(np.arange(min(n, len(dataset))))
    probe = FeatureCache(enabled=False, runtime=runtime)
    probe.features(model, subset.subset([0]), batch_size=batch_size, device=device, progress=False)  # warm-up
    start = time.perf_counter()
    probe.features(model, subset, batch_size=batch_size, device=device, progress=False)
    return len(subset) / max(time.perf_counter() - start, 1e-9)


def extract_candidates(engine, specs: list, parts: list, class_names, cache, *, batch_size: int, device,
                       throughput_images: int, num_workers: int = 0, progress: bool = False, log=print,
                       seed: int = 0) -> tuple[list[Candidate], list[dict]]:
    """Build a one-branch model per spec and get its features on every part through ``cache``.

    Returns ``(candidates, skipped)``; a spec that cannot be built is skipped with its error.
    """
    import torch

    from .config import parse_config

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
            feats = [np.asarray(cache.features(model, part, batch_size=batch_size, num_workers=num_workers,
                                               device=device, progress=progress)[0], dtype=np.float32)
                     for part in parts]
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
        candidates.append(Candidate(label=label, spec=spec, dim=int(model.branches[0].feature_dim),
                                    parameters=sum(p.numel() for p in model.branches[0].parameters()),
                                    images_per_second=round(rate, 2), extract_seconds=round(seconds, 3),
                                    cached=not extracted, features=np.concatenate(feats), model=model))
        log(f"  {label}: {candidates[-1].dim} features, {'cached' if not extracted else f'extracted in {seconds:.1f} s'}, "
            f"{rate:.1f} images/s")
    return candidates, skipped


def _handcrafted(parts, cache) -> tuple[np.ndarray, float]:
    """Handcrafted features of the parts (through the cache) and their extraction rate (images/s)."""
    import torch

    from .baselines import HANDCRAFTED_KINDS, handcrafted_for
    from .data import collate_images
    from .handcrafted import handcrafted_features

    feats = np.concatenate([np.asarray(handcrafted_for(p, cache), dtype=np.float32) for p in parts])
    sample = parts[0].subset(np.arange(min(64, len(parts[0]))))
    images, _ = collate_images([sample[i] for i in range(len(sample))], size=(64, 64))
    start = time.perf_counter()
    with torch.inference_mode():
        handcrafted_features(images, kinds=HANDCRAFTED_KINDS)
    return feats, round(len(sample) / max(time.perf_counter() - start, 1e-9), 2)


# ---------------------------------------------------------------------------- result


class SearchResult:
    """The leaderboard, the winner and its config, the selection steps and the timing."""

    def __init__(self, rows, winner, steps, stopped, skipped, fusions, timing, num_classes, class_names,
                 candidates, parts, engine, config, train_config, cache, device):
        self.rows, self.winner, self.steps, self.stopped, self.skipped = rows, winner, steps, stopped, skipped
        self.fusions, self.timing, self.num_classes, self.class_names = fusions, timing, num_classes, class_names
        self._candidates, self._parts, self.engine, self.config = candidates, parts, engine, config
        self.train_config, self._cache, self.device = train_config, cache, device
        self.ranking: dict | None = None
        self.final: dict | None = None

    @property
    def leaderboard(self) -> list[dict]:
        """Every row, best CV mean first (rows that failed last); the winner has ``"winner": True``."""
        ok = sorted((r for r in self.rows if r["cv_mean"] is not None), key=lambda r: (-r["cv_mean"], r["parameters"]))
        rows = ok + [r for r in self.rows if r["cv_mean"] is None]
        out = []
        for rank, row in enumerate(rows, 1):
            row = {"rank": rank if row["cv_mean"] is not None else None, **{k: v for k, v in row.items() if k != "subset"}}
            row["winner"] = row["candidate"] == self.winner["candidate"]
            out.append(row)
        return out

    @property
    def winner_config(self) -> dict:
        """The winner as a plain fused-model config (what ``fusion-engine train --config`` reads)."""
        fusion = dict(self.winner["fusion"])
        return {"backbones": [self._candidates[i].spec for i in self.winner["subset"]], "fusion": fusion}

    def to_dict(self) -> dict:
        return {"winner": self.winner["candidate"], "winner_config": self.winner_config,
                "leaderboard": self.leaderboard, "steps": self.steps, "stopped": self.stopped,
                "not_buildable": self.skipped, "fusions": self.fusions, "timing": self.timing,
                "ranking": self.ranking, "final": self.final, "config": self.config.model_dump(),
                "cv_training": {"folds": len(self._searcher.folds), "epochs": self._searcher.cv_config.epochs,
                                "patience": self._searcher.cv_config.patience}}

    def table(self) -> str:
        """The leaderboard as a markdown table."""
        held = any(r["held_out"] is not None for r in self.rows)
        head = "| rank | candidate | CV accuracy (mean ± sd) |" + (" held-out |" if held else "") + \
            " width | extraction img/s | parameters |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.leaderboard:
            mark = " **(winner)**" if r["winner"] else ""
            cv = f"{r['cv_mean']:.4f} ± {r['cv_std']:.4f}" if r["cv_mean"] is not None else \
                f"failed: {r.get('error', 'not scored')}"[:80]
            cells = [str(r["rank"] or "-"), r["candidate"] + mark, cv]
            if held:
                cells.append(f"{r['held_out']:.4f}" if r["held_out"] is not None else "-")
            cells += [str(r["feature_width"]), f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-",
                      _count(r["parameters"])]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        t = self.timing
        lines = [f"winner: {self.winner['candidate']} (CV {self.winner['cv_mean']:.4f} ± {self.winner['cv_std']:.4f}); "
                 f"search stopped: {self.stopped}",
                 f"extraction {t['extract_seconds']:.1f} s; selection {t['search_seconds']:.1f} s"
                 + (f" of a {t['budget_seconds']:.0f} s budget" if t.get("budget_seconds") else "")
                 + (f"; held-out report {t['report_seconds']:.1f} s" if t.get("report_seconds") else "")]
        if self.skipped:
            lines.append("not buildable: " + "; ".join(f"{s['candidate']} ({s['error'][:160]})" for s in self.skipped))
        if self.ranking:
            lines.append(self.ranking["statement"])
        return "\n".join(lines)

    # -- after the choice

    def score_held_out(self, test, *, batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                       log=print) -> None:
        """Score every row on ``test`` (refit on the training data as fit() trains); the choice is already made."""
        from .baselines import fit_tuned, handcrafted_for
        from .linear_probe import LinearProbe

        start = time.perf_counter()
        self._test, self._test_feats = test, {}
        self._test_options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        searcher = self._searcher
        y_test = np.asarray(test.targets)
        for row in self.rows:
            if row["cv_mean"] is None:
                continue
            if row["kind"] == "baseline":
                fit_idx, stop_idx = self._fit_split()
                hand_test = np.asarray(handcrafted_for(test, self._cache), dtype=np.float32)
                probe = LinearProbe(searcher.hand.shape[1], self.num_classes)
                fit_tuned(probe, searcher.hand[fit_idx], searcher.y[fit_idx], searcher.hand[stop_idx],
                          searcher.y[stop_idx], self.train_config.seed)
                row["held_out"] = _accuracy(probe.predict_proba(hand_test), y_test)
            else:
                row["held_out"] = self._held_out(row["subset"], row["fusion"])
        self.timing["report_seconds"] = round(time.perf_counter() - start, 3)
        self.ranking = rank_agreement(self.leaderboard, len(y_test))

    def _fit_split(self):
        n_fit = len(self._parts[0])
        return np.arange(n_fit), np.arange(n_fit, len(self._searcher.y))

    def _held_out(self, subset, fusion: dict) -> float:
        from .evaluation import logits_from_features

        for i in subset:
            if i not in self._test_feats:
                c = self._candidates[i]
                c.model.to(self.device)
                self._test_feats[i] = np.asarray(self._cache.features(c.model, self._test, device=self.device,
                                                                      **self._test_options)[0], dtype=np.float32)
                c.model.to("cpu")
        fit_idx, stop_idx = self._fit_split()
        feats = [self._candidates[i].features for i in subset]
        head = self._searcher.fit_head(fusion, feats, fit_idx, stop_idx, self.train_config)
        return _accuracy(logits_from_features(head, [self._test_feats[i] for i in subset], device=self.device),
                         np.asarray(self._test.targets))

    def score_fixed(self, backbones: list[str], fusion) -> float:
        """Held-out accuracy of a fixed configuration (candidate labels + a fusion), trained as fit() trains it:
        for comparisons in reports (after :meth:`score_held_out`)."""
        if getattr(self, "_test", None) is None:
            raise DataError("score_fixed needs the held-out data: run the search with test=...")
        by_label = {c.label: i for i, c in enumerate(self._candidates)}
        missing = [b for b in backbones if b not in by_label]
        if missing:
            raise ConfigError(f"not among the searched candidates: {missing}; candidates: {list(by_label)}")
        fusion = {"name": fusion} if isinstance(fusion, str) else dict(fusion)
        return self._held_out([by_label[b] for b in backbones], fusion)

    def fit(self, train, *, cache_dir=None, use_cache: bool = True, progress: bool = False, log=print, **options):
        """The winner built and trained on the training data exactly as ``fusion-engine train --config
        WINNER --seed S`` trains it (same split, same seeds); returns ``(model, history)``."""
        import torch

        from .training import fit

        torch.manual_seed(self.train_config.seed)
        model = self.engine.build(self.winner_config, class_names=self.class_names)
        history = fit(model, train, config=self.train_config, cache_dir=cache_dir, use_cache=use_cache,
                      progress=progress, log=log, **options)
        history["search"] = self.to_dict()
        model.extras["history"] = history
        return model, history

    def save(self, model, folder, **options) -> Path:
        """``model.save(folder)``, plus ``folder.config.json`` (the winner's config, to rerun or edit) and
        ``folder.search.json`` (the leaderboard) beside the folder; the manifest's history keeps the
        leaderboard too."""
        if isinstance(model.extras.get("history"), dict):
            model.extras["history"]["search"] = self.to_dict()
        out = model.save(folder, engine=options.pop("engine", self.engine), **options)
        config_path, board_path = side_paths(folder)
        config_path.write_text(json.dumps(self.winner_config, indent=2) + "\n")
        board_path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return out


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def side_paths(folder) -> tuple[Path, Path]:
    """``RUN_DIR.config.json`` and ``RUN_DIR.search.json``: beside the run folder, not inside it
    (its files are checked against the manifest)."""
    base = str(folder).rstrip("/\\")
    return Path(base + ".config.json"), Path(base + ".search.json")


def rank_agreement(leaderboard: list[dict], n_test: int, top: int = RANK_TOP) -> dict:
    """Does the CV order of the top rows agree with their held-out order?

    Pairs among the ``top`` rows (by CV) whose held-out order is reversed by more than the
    held-out noise (two binomial standard errors of the difference) are listed as disagreements.
    """
    rows = [r for r in leaderboard if r["cv_mean"] is not None and r["held_out"] is not None][:top]
    if len(rows) < 2:
        return {"rows": len(rows), "agree": None, "statement": "ranking check: fewer than two scored rows"}
    cv = np.array([r["cv_mean"] for r in rows])
    held = np.array([r["held_out"] for r in rows])
    discordant, reversed_pairs = [], 0
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            if cv[a] > cv[b] and held[a] < held[b]:
                reversed_pairs += 1
                p = (held[a] + held[b]) / 2
                noise = 2 * math.sqrt(2 * p * (1 - p) / max(n_test, 1))
                if held[b] - held[a] > noise:
                    discordant.append(f"{rows[a]['candidate']} ({cv[a]:.4f} CV, {held[a]:.4f} held-out) vs "
                                      f"{rows[b]['candidate']} ({cv[b]:.4f}, {held[b]:.4f})")
    pairs = len(rows) * (len(rows) - 1) // 2
    tau = (pairs - 2 * reversed_pairs) / pairs  # Kendall's tau (CV strictly ordered)
    best_held = held.max()
    winner_gap = float(best_held - held[0])
    agree = not discordant
    if agree:
        statement = (f"ranking check: the CV order of the top {len(rows)} rows agrees with their held-out order "
                     f"within noise (Kendall tau {tau:+.2f}; {reversed_pairs} of {pairs} pairs swapped, all within "
                     f"held-out noise; CV leader {100 * winner_gap:.2f} points below the best held-out of these rows)")
    else:
        statement = (f"ranking check: the CV order of the top {len(rows)} rows does NOT agree with the held-out order "
                     f"(Kendall tau {tau:+.2f}); beyond held-out noise: " + "; ".join(discordant))
    return {"rows": len(rows), "agree": agree, "kendall_tau": round(tau, 4), "reversed_pairs": reversed_pairs,
            "pairs": pairs, "discordant": discordant, "cv_leader_gap_to_best_held_out": round(winner_gap, 4),
            "statement": statement}


# ---------------------------------------------------------------------------- entry point


def search(train, candidates=None, *, test=None, engine=None, config: SearchConfig | None = None,
           train_config=None, fusions=None, cache_dir=None, use_cache: bool = True, progress: bool = False,
           log=print, **overrides) -> SearchResult:
    """Choose backbones and fusion for ``train`` by cross-validation on cached features.

    ``candidates``: backbone specs (a list), a candidates file, a dict ``{"backbones",
    "fusions"}``, or None for every entry of the local weights index (plus the ``handcrafted``
    backbone when its plugin is installed). ``fusions``: names or
    ``{name: [options, ...]}`` (default: every registered fusion with :data:`DEFAULT_GRID`).
    ``test``: scored only after the choice, for the report. ``overrides`` set
    :class:`SearchConfig` fields (``time_budget`` in minutes, ``max_branches``, ``folds``...).
    ``train_config``: the :class:`~fusion_engine.training.TrainConfig` of the final training
    (its seed, split, learning rate and device are used by the search too).
    """
    from .data import load_dataset, stratified_split
    from .engine import Engine
    from .evaluation import align_classes
    from .features import FeatureCache
    from .training import TrainConfig, resolve_device, seed_everything

    config = (config or SearchConfig()).model_copy(update=overrides) if overrides else (config or SearchConfig())
    config = SearchConfig.model_validate(config.model_dump())
    train_config = train_config or TrainConfig()
    engine = engine or Engine.from_plugins()
    # as in the default model, classic features may fuse with deep ones: the handcrafted plugin joins the index
    extras = [{"name": "handcrafted"}] if "handcrafted" in engine.registry.names("backbone") else []
    specs, file_fusions = load_candidates(candidates, extras)
    grid = normalise_grid(fusions) or file_fusions or config.fusions or {
        c.name: DEFAULT_GRID.get(c.name, [{}]) for c in engine.components("fusion")}
    fusion_list, fusion_problems = [], []
    for name, option_sets in grid.items():
        for options in option_sets:
            try:
                engine.registry.get("fusion", name).validate_options(dict(options), f"fusion {name}")
                fusion_list.append({"name": name, **options})
            except FusionEngineError as exc:
                fusion_problems.append({"fusion": fusion_label(name, options), "error": str(exc)})
    if not fusion_list:
        raise ConfigError("no candidate fusion is valid: " + "; ".join(p["error"] for p in fusion_problems))
    if config.screen is not None:
        screen = {"name": config.screen} if isinstance(config.screen, str) else dict(config.screen)
        engine.registry.get("fusion", screen["name"]).validate_options(
            {k: v for k, v in screen.items() if k != "name"}, "screen fusion")
    else:
        screen = dict(SCREEN_FUSION) if "concat" in engine.registry.names("fusion") else dict(fusion_list[0])

    device = resolve_device(train_config.device)
    train = load_dataset(train)
    seed_everything(train_config.seed)
    parts = list(stratified_split(train, train_config.val_fraction, train_config.seed))  # fit()'s split
    cache = FeatureCache(cache_dir, enabled=use_cache, runtime=train_config.extract_runtime)  # as fit() extracts
    log(f"search: {len(specs)} candidate backbones, {len(fusion_list)} fusion settings "
        f"({', '.join(fusion_label(f['name'], {k: v for k, v in f.items() if k != 'name'}) for f in fusion_list)}); "
        f"{len(train)} training images, {config.folds}-fold CV")
    start = time.perf_counter()
    cands, skipped = extract_candidates(engine, specs, parts, train.classes, cache, batch_size=train_config.batch_size,
                                        device=device, throughput_images=config.throughput_images,
                                        num_workers=train_config.num_workers, progress=progress, log=log,
                                        seed=train_config.seed)
    if not cands:
        raise ConfigError("no candidate backbone could be built: " + "; ".join(f"{s['candidate']}: {s['error']}"
                                                                                for s in skipped))
    hand, hand_rate = _handcrafted(parts, cache) if config.baseline else (None, None)
    extract_seconds = time.perf_counter() - start
    y = np.concatenate([np.asarray(p.targets) for p in parts])
    searcher = Searcher(engine, cands, y, len(parts[0]), len(train.classes), config, train_config, device, log, hand)
    searcher.hand_rate = hand_rate
    outcome = searcher.run(fusion_list, screen)
    search_seconds = searcher.clock.elapsed
    baseline_start = time.perf_counter()
    if config.baseline:  # a reference row, not a candidate: outside the selection's budget
        searcher.baseline_row()
    log(f"search: {outcome['stopped']}; winner {outcome['winner']['candidate']}")
    rows = list(searcher.rows.values())
    timing = {"extract_seconds": round(extract_seconds, 3), "search_seconds": round(search_seconds, 3),
              "budget_seconds": config.time_budget * 60 if config.time_budget else None,
              "budget_exhausted": searcher.clock.exhausted, "longest_fold_seconds": round(searcher.longest_fold, 3),
              "evaluations": sum(r["cv_mean"] is not None for r in rows),
              "skipped_for_budget": len(searcher.skipped_for_budget),
              "baseline_seconds": round(time.perf_counter() - baseline_start, 3) if config.baseline else None,
              "cached_backbones": sum(c.cached for c in cands)}
    result = SearchResult(rows, outcome["winner"], outcome["steps"], outcome["stopped"], skipped,
                          {"tried": [fusion_label(f["name"], {k: v for k, v in f.items() if k != "name"})
                                     for f in fusion_list], "invalid": fusion_problems,
                           "screen": fusion_label(screen["name"], {k: v for k, v in screen.items() if k != "name"})},
                          timing, len(train.classes), list(train.classes), cands, parts, engine, config,
                          train_config, cache, device)
    result._searcher = searcher
    if test is not None and config.held_out:  # only now, after the choice, is the test data read
        from types import SimpleNamespace

        test = align_classes(SimpleNamespace(class_names=list(train.classes)), load_dataset(test))
        result.score_held_out(test, batch_size=train_config.batch_size, num_workers=train_config.num_workers,
                              progress=progress, log=log)
    return result


# ---------------------------------------------------------------------------- CLI


def add_search_options(parser) -> None:
    """The ``--search`` flags of ``fusion-engine train``."""
    group = parser.add_argument_group("automatic selection (--search)")
    group.add_argument("--search", action="store_true",
                       help="choose backbones and fusion by cross-validation on the training data, then train the winner")
    group.add_argument("--candidates", metavar="FILE",
                       help="candidate backbones (JSON/YAML: a list, or {\"backbones\": [...], \"fusions\": ...}); "
                            "default: every entry of the weights index")
    group.add_argument("--time-budget", type=float, metavar="MIN", help="minutes for the selection after extraction")
    group.add_argument("--max-branches", type=int, metavar="K", help="largest backbone subset (default 3)")
    group.add_argument("--folds", type=int, help="cross-validation folds (default 5)")
    group.add_argument("--prefer-best", action="store_true",
                       help="pick the best CV row even if its extra backbones gained less than the fold noise")
    group.add_argument("--search-epochs", type=int, metavar="N", help="head epochs per CV fold (default: about 300 optimizer steps, 10 to --epochs)")


def run_search(args) -> int:
    """``fusion-engine train --search``: select, train the winner, evaluate it on held-out data, save RUN_DIR."""
    from .cli import _apply_weights_dir, _encryption_key, _summary, load_train_test, train_config_from
    from .metrics import format_report

    _apply_weights_dir(args)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    if args.config:
        raise ConfigError("--search chooses the backbones and the fusion itself; give the candidate backbones with "
                          "--candidates FILE instead of --config (or drop --search to train that config)")
    if args.mode == "finetune":
        raise ConfigError("--search works on frozen, cached features; train the chosen config with --mode finetune "
                          "afterwards (fusion-engine train --config RUN_DIR.config.json --mode finetune)")
    data, train_data, test_data = load_train_test(args, log, " (the search sees only these)")
    train_config = train_config_from(args)  # --mode finetune was refused above
    search_overrides = {k: v for k, v in {"time_budget": args.time_budget, "max_branches": args.max_branches,
                                          "folds": args.folds, "epochs": args.search_epochs,
                                          "prefer_fewer": False if args.prefer_best else None}.items() if v is not None}
    from .engine import Engine

    engine = Engine.from_plugins()
    encryption_key = _encryption_key(args, required=args.encrypt)
    result = search(train_data, args.candidates, test=test_data, engine=engine, train_config=train_config,
                    fusions=[args.fusion] if args.fusion else None, cache_dir=args.cache_dir,
                    use_cache=not args.no_cache, progress=not args.quiet, log=log, **search_overrides)
    start = time.perf_counter()
    model, history = result.fit(train_data, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                progress=not args.quiet, log=log)
    from .features import FeatureCache

    device = train_config.device if train_config.device != "auto" else "cpu"
    report = model.evaluate(test_data, cache=FeatureCache(args.cache_dir, enabled=not args.no_cache), device=device,
                            progress=not args.quiet)
    result.final = {"held_out_accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                    "seconds": round(time.perf_counter() - start, 3)}
    history["search"] = result.to_dict()
    model.extras["metrics"] = {"test": report}
    out = result.save(model, args.out, engine=engine, encryption_key=encryption_key, signing_key=args.sign_key)
    config_path, board_path = side_paths(args.out)
    if args.json:
        print(json.dumps({**_summary(report), "run_dir": str(out), "config": str(config_path),
                          "search": result.to_dict()}, default=str))
    else:
        log("\n" + result.table())
        log(result.summary())
        log(f"\nheld-out test results of the trained winner ({len(test_data)} images the search never saw):")
        log(format_report(report))
        log(f"saved to {out}; its config: {config_path} (rerun or edit it: fusion-engine train --config "
            f"{config_path}); leaderboard: {board_path}")
    return 0


__all__ = ["SearchConfig", "SearchResult", "search", "load_candidates", "add_search_options", "run_search",
           "DEFAULT_GRID", "side_paths", "rank_agreement"]
