"""The cross-validated selection of backbones and fusion, on the candidates' cached features.

On the training data only (the held-out data is never read here):

1. score every candidate backbone alone (stratified k-fold CV, the *screening* fusion:
   ``concat``, a linear head on normalised features);
2. greedy forward selection: the best subset so far is extended by the backbone whose
   addition scores best under the screening fusion; every candidate fusion (every
   registered fusion, plugins included, with a small option grid each) is then scored on
   the extended subset; the extension is kept only when its best row beats the previous
   best row by more than the fold noise (the standard error of the paired per-fold
   differences), else the search stops;
3. the winner is the best row of the last accepted subset.

Rows race (``race_margin``): after :data:`RACE_FOLDS` folds, a row that trails the leader (the best row scored
on every fold so far) on those same folds by more than ``race_margin`` and by more than two standard errors of
the paired differences stops there, as scikit-learn's successive halving drops candidates early. It keeps its
partial CV (``cv_folds`` shorter, ``stopped_early`` says why) and cannot win; the leader always has every fold.

Each CV fold trains a head as ``fit()`` does (gradient fusions: early stopping on a split of
the fold's training rows; fitted fusions such as stacking: ``fusion.fit``), with a modest
epoch count. The time budget covers the selection: a row starts only when its estimated time
fits in what is left, a fold only when its estimate fits, so the selection ends at most one
fold past the budget; the first row always runs.

:func:`rank_agreement` checks, after the choice, whether the CV order agrees with the held-out order.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from fusion_engine.core.probes import LinearProbe
from fusion_engine.core.progress import Progress
from fusion_engine.errors import DataError
from fusion_engine.search.candidates import Candidate, fusion_label, setting_label
from fusion_engine.search.config import SearchConfig
from fusion_engine.training.baselines import fit_tuned
from fusion_engine.training.config import TrainConfig, seed_everything
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.fit import train_head

CV_STEPS = 300  # optimizer steps a CV fold's head trains for by default (before early stopping)
RACE_FOLDS = 2  # folds a row always gets before it may stop early (see race_margin)
RANK_TOP = 5  # the leaderboard's CV order is checked against the held-out order for this many rows


class BudgetExhausted(Exception):
    """A fold no longer fits in the time budget: the row being scored is dropped and the selection stops."""


class _Clock:
    """The selection's time budget (None: unlimited); ``exhausted`` once an estimate did not fit."""

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


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose highest score is the label."""
    return float((logits.argmax(1) == y).mean())


def inner_split(idx: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (fit, early-stopping) parts, stratified when every class allows it."""
    from sklearn.model_selection import train_test_split  # scikit-learn is slow to import: only when used

    try:
        fit, stop = train_test_split(idx, test_size=fraction, stratify=y[idx], random_state=seed)
    except ValueError:
        fit, stop = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(fit), np.sort(stop)


class Searcher:
    """Holds the candidates' features, the folds and every scored row; see
    :func:`fusion_engine.search.run.search`.

    ``hand``: the baseline's handcrafted features (fit's split order), ``hand_rate`` their extraction
    rate in images/s; None without the baseline row.
    """

    def __init__(
        self,
        engine,
        candidates: list[Candidate],
        y: np.ndarray,
        n_fit: int,
        num_classes: int,
        config: SearchConfig,
        train_config: TrainConfig,
        device,
        log,
        hand: np.ndarray | None = None,
        hand_rate: float | None = None,
        progress: bool = False,
    ):
        from sklearn.model_selection import StratifiedKFold  # slow to import: only when used

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
            rows = int(len(y) * (folds - 1) / folds * (1 - train_config.val_fraction))
            steps = math.ceil(rows / min(train_config.head_batch_size, max(16, rows // 20)))  # train_head's batches
            epochs = min(train_config.epochs, max(10, math.ceil(CV_STEPS / steps)))
        self.cv_config = train_config.model_copy(update={"epochs": epochs, "patience": min(config.patience, epochs)})
        self.rows: dict[tuple, dict] = {}
        self.fold_seconds: dict[str, tuple[float, int]] = {}  # fusion label -> (seconds per fold, width)
        self.clock = _Clock(config.time_budget * 60 if config.time_budget else None)
        self.longest_fold = 0.0
        self.fold_seconds_by_name: dict[str, tuple[float, int]] = {}
        self.skipped_for_budget: list[str] = []
        self.mandatory = True  # the first evaluation always completes: a search must return something
        self.hand_rate = hand_rate
        self.progress = progress  # a bar over the rows of each selection step
        self.leader: dict | None = None  # the best row scored on every fold

    # -- one fusion on a subset of backbones, trained on some rows and scored on others

    def make_head(self, fusion: dict, in_dims: list[int]):
        name, options = fusion["name"], {k: v for k, v in fusion.items() if k != "name"}
        component = self.engine.registry.get("fusion", name)
        options = component.validate_options(options, f"fusion {fusion_label(name, options)}")
        seed_everything(self.train_config.seed)
        return component.factory(list(in_dims), self.num_classes, **options)

    def fit_head(self, fusion: dict, feats: list[np.ndarray], fit_idx, stop_idx, config):
        """A head trained as fit() trains one: a fitted fusion (stacking) on ``fit_idx``; a gradient
        fusion on ``fit_idx`` with early stopping on ``stop_idx``."""
        head = self.make_head(fusion, [f.shape[1] for f in feats])
        y = self.y
        if getattr(head, "requires_fit", False):
            head.fit([f[fit_idx] for f in feats], y[fit_idx])
        else:
            train_head(
                head,
                [f[fit_idx] for f in feats],
                y[fit_idx],
                [f[stop_idx] for f in feats],
                y[stop_idx],
                config,
                self.device,
                log=lambda *a, **k: None,
            )
        return head

    def trails_leader(self, scores: list[float]) -> str | None:
        """Why a row with these first fold scores stops racing (see the module docstring), or None."""
        margin, leader = self.config.race_margin, self.leader
        if not margin or leader is None or not RACE_FOLDS <= len(scores) < len(self.folds):
            return None
        diffs = np.subtract(scores, leader["cv_folds"][: len(scores)])
        gap, noise = -float(diffs.mean()), 2 * float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
        if gap <= max(margin, noise):
            return None
        return (
            f"stopped after {len(scores)} of {len(self.folds)} folds: {100 * gap:.1f} points behind "
            f"{leader['candidate']} on those folds (race margin {100 * margin:.1f}, 2 s.e. {100 * noise:.1f})"
        )

    def score_folds(self, subset: tuple[int, ...], fusion: dict) -> tuple[list[float], int, str | None]:
        """Per-fold accuracies of ``fusion`` on ``subset``, the head's parameter count, and why the row stopped
        before the last fold (None: it did not); each fold trains on its training rows (split once more for
        early stopping, as fit() splits) and scores its held rows."""
        feats = [self.candidates[i].features for i in subset]
        width = sum(f.shape[1] for f in feats)
        key = setting_label(fusion)
        scores, head_params = [], 0
        for train_idx, held_idx in self.folds:
            if not self.mandatory and not self.clock.allows(self._estimate(fusion, width)):
                raise BudgetExhausted  # the estimate before the row was wrong: drop the row, stop the search
            start = time.perf_counter()
            fit_idx, stop_idx = inner_split(train_idx, self.y, self.train_config.val_fraction, self.train_config.seed)
            head = self.fit_head(fusion, feats, fit_idx, stop_idx, self.cv_config)
            scores.append(
                accuracy(logits_from_features(head, [f[held_idx] for f in feats], device=self.device), self.y[held_idx])
            )
            head_params = sum(p.numel() for p in head.parameters())
            self.fold_seconds[key] = self.fold_seconds_by_name[fusion["name"]] = (time.perf_counter() - start, width)
            self.longest_fold = max(self.longest_fold, self.fold_seconds[key][0])
            stopped = self.trails_leader(scores)
            if stopped:
                return scores, head_params, stopped
        return scores, head_params, None

    # -- rows of the leaderboard

    def _estimate(self, fusion: dict, width: int) -> float:
        """Seconds one fold of ``fusion`` should take at this feature width: the last fold of the same
        settings, else of the same fusion, scaled up by width; else the others' mean per feature; else 0."""
        key = setting_label(fusion)
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
            "candidate": f"{setting_label(fusion)} [{' + '.join(c.label for c in members)}]",
            "kind": "single" if len(subset) == 1 else "fused",
            "backbones": [c.label for c in members],
            "subset": list(subset),
            "fusion": dict(fusion),
            "cv_mean": None,
            "cv_std": None,
            "cv_folds": None,
            "held_out": None,
            "feature_width": sum(c.dim for c in members),
            "images_per_second": round(1.0 / sum(1.0 / r for r in rates), 2) if all(rates) else None,
            "parameters": sum(c.parameters for c in members),
            "step": step,
            "seconds": None,
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
            scores, head_params, stopped = self.score_folds(subset, fusion)
        except BudgetExhausted:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin fusion that fails is a row with an error, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"
            self.rows[key] = row
            self.log(f"  {row['candidate']}: failed: {row['error']}")
            return row
        self.mandatory = False
        row.update(
            cv_mean=float(np.mean(scores)),
            cv_std=float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            cv_folds=[round(s, 6) for s in scores],
            seconds=round(time.perf_counter() - start, 3),
        )
        row["parameters"] += head_params
        self.rows[key] = row
        if stopped:
            row["stopped_early"] = stopped
        elif self.leader is None or ranked(row) > ranked(self.leader):
            self.leader = row
        note = f" ({stopped})" if stopped else ""
        self.log(
            f"  [{self.clock.elapsed:6.1f} s] {row['candidate']}: CV {row['cv_mean']:.4f} ± {row['cv_std']:.4f}{note}"
        )
        return row

    def baseline_row(self) -> dict | None:
        """Handcrafted features (HOG + colour histogram) with a tuned logistic regression."""
        if self.hand is None:
            return None
        row = {
            "candidate": "handcrafted: HOG + colour histogram + logistic regression",
            "kind": "baseline",
            "backbones": [],
            "subset": [],
            "fusion": None,
            "cv_mean": None,
            "cv_std": None,
            "cv_folds": None,
            "held_out": None,
            "feature_width": int(self.hand.shape[1]),
            "images_per_second": self.hand_rate,
            "parameters": 0,
            "step": 0,
            "seconds": None,
        }
        start, scores = time.perf_counter(), []
        for train_idx, held_idx in self.folds:
            fit_idx, stop_idx = inner_split(train_idx, self.y, self.train_config.val_fraction, self.train_config.seed)
            probe = LinearProbe(self.hand.shape[1], self.num_classes)
            fit_tuned(
                probe,
                self.hand[fit_idx],
                self.y[fit_idx],
                self.hand[stop_idx],
                self.y[stop_idx],
                self.train_config.seed,
            )
            scores.append(accuracy(probe.predict_proba(self.hand[held_idx]), self.y[held_idx]))
        row["parameters"] = sum(p.numel() for p in probe.parameters())
        row.update(
            cv_mean=float(np.mean(scores)),
            cv_std=float(np.std(scores, ddof=1)),
            cv_folds=scores,
            seconds=round(time.perf_counter() - start, 3),
        )
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
            bar = Progress(
                n - len(current) + len(fusions), f"search: subsets of {size} backbone(s)", self.progress, unit="row"
            )

            def evaluate(subset, fusion, step, bar=bar):
                row = self.evaluate(subset, fusion, step)
                bar.update(1, **({"CV": row["cv_mean"]} if row["cv_mean"] is not None else {}))
                return row

            try:
                if size == 1:
                    for i in range(n):
                        screened.append(evaluate((i,), screen, 1))
                else:
                    for i in range(n):
                        if i not in current:
                            screened.append(evaluate(tuple(sorted(current + (i,))), screen, size))
            except BudgetExhausted:
                budget_hit = True
            screened = [r for r in screened if r["cv_mean"] is not None]
            if not screened:
                bar.close()
                stopped = (
                    "time budget reached" if budget_hit or self.clock.exhausted else "no candidate could be scored"
                )
                break
            pick = max(screened, key=ranked)
            subset = tuple(pick["subset"])
            rows = [pick]
            if not budget_hit:
                try:
                    for fusion in fusions:
                        rows.append(evaluate(subset, fusion, size))
                except BudgetExhausted:
                    budget_hit = True
            bar.close()  # a step may end early (the time budget)
            best = max((r for r in rows if r["cv_mean"] is not None), key=ranked)
            step = {
                "size": size,
                "subset": [self.candidates[i].label for i in subset],
                "best": best["candidate"],
                "cv_mean": best["cv_mean"],
                "fusions_scored": len({r["candidate"] for r in rows if r["cv_mean"] is not None}),
            }
            if best_row is None:
                step["accepted"] = True
            else:  # on the folds both have (a row that stopped early has fewer and is never accepted)
                diffs = np.asarray(best["cv_folds"]) - np.asarray(best_row["cv_folds"][: len(best["cv_folds"])])
                gain = float(diffs.mean())
                noise = float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
                step.update(
                    gain=round(gain, 6),
                    noise=round(noise, 6),
                    accepted=bool(gain > max(noise, self.config.min_gain)) and "stopped_early" not in best,
                )
            steps.append(step)
            if not step["accepted"] and (budget_hit or self.clock.exhausted):
                step["complete"] = False
                stopped = (
                    f"time budget reached while scoring subsets of {size} backbones "
                    f"({step['fusions_scored']} of {len(fusions) + 1} fusion settings scored)"
                )
                break
            if not step["accepted"]:
                added = self.candidates[(set(subset) - set(current)).pop()].label
                stopped = (
                    f"adding {added} gained {100 * step['gain']:+.2f} points, not more than the fold noise "
                    f"({100 * step['noise']:.2f}"
                    + (f", min_gain {100 * self.config.min_gain:.2f}" if self.config.min_gain else "")
                    + ")"
                )
                break
            best_row, current = best, subset
            if budget_hit or self.clock.exhausted:
                stopped = "time budget reached"
                break
        if stopped is None:
            stopped = "max_branches reached" if len(current) == self.config.max_branches else "every candidate used"
        if best_row is not None and not self.config.prefer_fewer:
            best_row = max((r for r in self.rows.values() if r["cv_mean"] is not None), key=ranked)
        for i in range(len(self.candidates)):  # every single backbone is a row, scored or not
            key = ((i,), json.dumps(screen, sort_keys=True, default=str))
            if key not in self.rows:
                self.rows[key] = self._row((i,), screen, 1)
                self.rows[key]["error"] = "not scored: time budget reached"
        return {"winner": best_row, "steps": steps, "stopped": stopped}


def ranked(row: dict) -> tuple:
    """Sort key of scored rows, best last: every fold scored before stopped early, then CV mean, then fewer
    parameters."""
    return ("stopped_early" not in row, row["cv_mean"], -row["parameters"])


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
                    discordant.append(
                        f"{rows[a]['candidate']} ({cv[a]:.4f} CV, {held[a]:.4f} held-out) vs "
                        f"{rows[b]['candidate']} ({cv[b]:.4f}, {held[b]:.4f})"
                    )
    pairs = len(rows) * (len(rows) - 1) // 2
    tau = (pairs - 2 * reversed_pairs) / pairs  # Kendall's tau (CV strictly ordered)
    best_held = held.max()
    winner_gap = float(best_held - held[0])
    agree = not discordant
    if agree:
        statement = (
            f"ranking check: the CV order of the top {len(rows)} rows agrees with their held-out order "
            f"within noise (Kendall tau {tau:+.2f}; {reversed_pairs} of {pairs} pairs swapped, all within "
            f"held-out noise; CV leader {100 * winner_gap:.2f} points below the best held-out of these rows)"
        )
    else:
        statement = (
            f"ranking check: the CV order of the top {len(rows)} rows does NOT agree with the held-out order "
            f"(Kendall tau {tau:+.2f}); beyond held-out noise: " + "; ".join(discordant)
        )
    return {
        "rows": len(rows),
        "agree": agree,
        "kendall_tau": round(tau, 4),
        "reversed_pairs": reversed_pairs,
        "pairs": pairs,
        "discordant": discordant,
        "cv_leader_gap_to_best_held_out": round(winner_gap, 4),
        "statement": statement,
    }
