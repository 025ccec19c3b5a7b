"""The outcome of a search: :class:`SearchResult` (leaderboard, winner, steps, timing), the held-out
report after the choice, and training and saving the winner.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_engine.api.engine import Engine
from fusion_engine.core.probes import LinearProbe
from fusion_engine.errors import ConfigError, DataError
from fusion_engine.search.candidates import Candidate
from fusion_engine.search.config import SearchConfig
from fusion_engine.search.selection import Searcher, accuracy, rank_agreement, ranked
from fusion_engine.training.baselines import fit_tuned, handcrafted_for
from fusion_engine.training.config import TrainConfig
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.fit import fit as fit_model


@dataclass(eq=False)
class SearchResult:
    """The leaderboard, the winner and its config, the selection steps and the timing.

    Made by :func:`fusion_engine.search.run.search`; :meth:`score_held_out` (run by the search when it
    is given test data) fills ``held_out`` in every row and :attr:`ranking`; :meth:`fit` trains the
    winner, :meth:`save` saves it with its config and the leaderboard beside it.
    """

    rows: list[dict]
    """Every row of the leaderboard in the order it was scored: ``candidate``, ``kind`` (single, fused or
    baseline), ``backbones``, ``subset`` (candidate indices), ``fusion``, ``cv_mean``/``cv_std``/``cv_folds``
    (None when not scored, then ``error`` says why), ``held_out``, ``feature_width``, ``images_per_second``,
    ``parameters``, ``step``, ``seconds``."""
    winner: dict
    """The chosen row (one of :attr:`rows`)."""
    steps: list[dict]
    """One entry per subset size of the greedy selection: the subset, its best row, gain, noise, accepted."""
    stopped: str
    """Why the selection stopped, in words."""
    skipped: list[dict]
    """Candidate backbones that could not be built or extracted: ``{"candidate", "error"}``."""
    fusions: dict
    """The fusion settings: ``tried`` (labels), ``invalid`` (``{"fusion", "error"}``), ``screen`` (label)."""
    timing: dict
    """Seconds of extraction, selection and baseline, the budget, evaluations and cache use."""
    class_names: list[str]
    """The training data's classes, in label order."""
    candidates: list[Candidate] = field(repr=False)
    """The candidate backbones that were built, with their features on the training data."""
    parts: list = field(repr=False)
    """The training data split as ``fit()`` splits it: (fit part, early-stopping part)."""
    searcher: Searcher = field(repr=False)
    """The selection's state: folds, CV training options, baseline features; refits rows for the report."""
    engine: Engine = field(repr=False)
    """The engine that built the candidates (and builds the winner)."""
    config: SearchConfig
    """The search's options."""
    train_config: TrainConfig = field(repr=False)
    """The final training's options (its seed, split and device were used by the search too)."""
    cache: FeatureCache = field(repr=False)
    """The feature cache the candidates were extracted through (the held-out features go through it too)."""
    device: torch.device
    """Where heads were trained and features extracted."""
    ranking: dict | None = None
    """After :meth:`score_held_out`: does the CV order of the top rows agree with the held-out order
    (:func:`~fusion_engine.search.selection.rank_agreement`)."""
    final: dict | None = None
    """Set by the caller after training the winner: its held-out accuracy, macro F1 and seconds (reports)."""
    _test: Any = field(default=None, init=False, repr=False)
    """The held-out data, once :meth:`score_held_out` has run."""
    _test_feats: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    """Held-out features per candidate index, extracted on demand."""
    _test_options: dict = field(default_factory=dict, init=False, repr=False)
    """Extraction options for the held-out features."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def leaderboard(self) -> list[dict]:
        """Every row, best CV mean first (rows that stopped early after them, then those not scored); the winner
        has ``"winner": True``."""
        ok = sorted((r for r in self.rows if r["cv_mean"] is not None), key=ranked, reverse=True)
        rows = ok + [r for r in self.rows if r["cv_mean"] is None]
        out = []
        for rank, row in enumerate(rows, 1):
            row = {
                "rank": rank if row["cv_mean"] is not None else None,
                **{k: v for k, v in row.items() if k != "subset"},
            }
            row["winner"] = row["candidate"] == self.winner["candidate"]
            out.append(row)
        return out

    @property
    def winner_config(self) -> dict:
        """The winner as a plain fused-model config (what ``fusion-engine train --config`` reads)."""
        fusion = dict(self.winner["fusion"])
        return {"backbones": [self.candidates[i].spec for i in self.winner["subset"]], "fusion": fusion}

    def to_dict(self) -> dict:
        return {
            "winner": self.winner["candidate"],
            "winner_config": self.winner_config,
            "leaderboard": self.leaderboard,
            "steps": self.steps,
            "stopped": self.stopped,
            "not_buildable": self.skipped,
            "fusions": self.fusions,
            "timing": self.timing,
            "ranking": self.ranking,
            "final": self.final,
            "config": self.config.model_dump(),
            "cv_training": {
                "folds": len(self.searcher.folds),
                "epochs": self.searcher.cv_config.epochs,
                "patience": self.searcher.cv_config.patience,
            },
        }

    def table(self) -> str:
        """The leaderboard as a markdown table."""
        held = any(r["held_out"] is not None for r in self.rows)
        head = (
            "| rank | candidate | CV accuracy (mean ± sd) |"
            + (" held-out |" if held else "")
            + " width | extraction img/s | parameters |"
        )
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.leaderboard:
            mark = " **(winner)**" if r["winner"] else ""
            cv = (
                f"{r['cv_mean']:.4f} ± {r['cv_std']:.4f}"
                if r["cv_mean"] is not None
                else f"failed: {r.get('error', 'not scored')}"[:80]
            )
            if r.get("stopped_early"):
                cv += f" ({len(r['cv_folds'])} of {len(self.searcher.folds)} folds: stopped early)"
            cells = [str(r["rank"] or "-"), r["candidate"] + mark, cv]
            if held:
                cells.append(f"{r['held_out']:.4f}" if r["held_out"] is not None else "-")
            cells += [
                str(r["feature_width"]),
                f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-",
                _count(r["parameters"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        t = self.timing
        lines = [
            f"winner: {self.winner['candidate']} (CV {self.winner['cv_mean']:.4f} ± {self.winner['cv_std']:.4f}); "
            f"search stopped: {self.stopped}",
            f"extraction {t['extract_seconds']:.1f} s; selection {t['search_seconds']:.1f} s"
            + (f" of a {t['budget_seconds']:.0f} s budget" if t.get("budget_seconds") else "")
            + (f"; held-out report {t['report_seconds']:.1f} s" if t.get("report_seconds") else ""),
        ]
        if self.skipped:
            lines.append("not buildable: " + "; ".join(f"{s['candidate']} ({s['error'][:160]})" for s in self.skipped))
        if self.ranking:
            lines.append(self.ranking["statement"])
        lines += self.fusion_verdict()
        return "\n".join(lines)

    def fusion_verdict(self) -> list[str]:
        """In words: whether the winner is fused at all, and every kind of row (the handcrafted baseline, a
        single backbone) that beats it on CV or on held-out data; or that none does."""
        w = self.winner
        what = "the fused winner" if w["kind"] == "fused" else "the winner"
        others = [r for r in self.rows if r is not w and r["cv_mean"] is not None]
        lines = []
        if w["kind"] == "single" and any(r["kind"] == "fused" for r in others):
            best = max((r for r in others if r["kind"] == "fused"), key=lambda r: r["cv_mean"])
            lines.append(
                f"fusion did not win: the winner is a single backbone; the best fused row, {best['candidate']}, "
                f"scored CV {best['cv_mean']:.4f} against the winner's {w['cv_mean']:.4f}"
            )
        n_test = len(self._test) if self._test is not None else 0
        beaten = []
        for key, measure in (("cv_mean", "CV"), ("held_out", "held-out")):
            if w.get(key) is None:
                continue
            single = "another single backbone" if w["kind"] == "single" else "a single backbone"
            for kind, noun in (("baseline", "the handcrafted baseline"), ("single", single)):
                rivals = [r for r in others if r["kind"] == kind and r.get(key) is not None and r[key] > w[key]]
                if not rivals:
                    continue
                best = max(rivals, key=lambda r: r[key])
                gap = 100 * (best[key] - w[key])
                if key == "cv_mean":  # the standard error of the paired fold differences, as the selection uses
                    a, b = best["cv_folds"] or [], w["cv_folds"] or []
                    diffs = np.subtract(a, b, dtype=float) if len(a) == len(b) else np.zeros(0)
                    noise = 100 * float(diffs.std(ddof=1)) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
                else:
                    p = (best[key] + w[key]) / 2
                    noise = 100 * 2 * (2 * p * (1 - p) / max(n_test, 1)) ** 0.5 if n_test else 0.0
                within = f" (within the {measure} noise, about {noise:.2f} points)" if noise and gap <= noise else ""
                beaten.append(
                    f"{noun} beats {what} on {measure}: {best['candidate']} {best[key]:.4f} against "
                    f"{w[key]:.4f}, {gap:.2f} points more{within}"
                )
        lines += [f"NOTE: {line}" for line in beaten]
        kinds = {r["kind"] for r in others}
        if not beaten and w["kind"] == "fused" and kinds & {"baseline", "single"}:
            on = "CV and held-out data" if w.get("held_out") is not None else "CV"
            rivals = " and ".join(
                noun
                for kind, noun in (("baseline", "the handcrafted baseline"), ("single", "every single backbone"))
                if kind in kinds
            )
            lines.append(f"fusion won: the fused winner beats {rivals} on {on}")
        return lines

    # -- after the choice

    def score_held_out(
        self, test, *, batch_size: int = 64, num_workers: int = 0, progress: bool = False, log=print
    ) -> None:
        """Score every row on ``test`` (refit on the training data as fit() trains); the choice is already made."""
        start = time.perf_counter()
        self._test, self._test_feats = test, {}
        self._test_options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        searcher = self.searcher
        y_test = np.asarray(test.targets)
        for row in self.rows:
            if row["cv_mean"] is None:
                continue
            if row["kind"] == "baseline":
                fit_idx, stop_idx = self._fit_split()
                hand_test = np.asarray(handcrafted_for(test, self.cache), dtype=np.float32)
                probe = LinearProbe(searcher.hand.shape[1], self.num_classes)
                fit_tuned(
                    probe,
                    searcher.hand[fit_idx],
                    searcher.y[fit_idx],
                    searcher.hand[stop_idx],
                    searcher.y[stop_idx],
                    self.train_config.seed,
                )
                row["held_out"] = accuracy(probe.predict_proba(hand_test), y_test)
            else:
                row["held_out"] = self._held_out(row["subset"], row["fusion"])
        self.timing["report_seconds"] = round(time.perf_counter() - start, 3)
        self.ranking = rank_agreement(self.leaderboard, len(y_test))

    def _fit_split(self):
        n_fit = len(self.parts[0])
        return np.arange(n_fit), np.arange(n_fit, len(self.searcher.y))

    def _held_out(self, subset, fusion: dict) -> float:
        for i in subset:
            if i not in self._test_feats:
                c = self.candidates[i]
                c.model.to(self.device)
                self._test_feats[i] = np.asarray(
                    self.cache.features(c.model, self._test, device=self.device, **self._test_options)[0],
                    dtype=np.float32,
                )
                c.model.to("cpu")
        fit_idx, stop_idx = self._fit_split()
        feats = [self.candidates[i].features for i in subset]
        head = self.searcher.fit_head(fusion, feats, fit_idx, stop_idx, self.train_config)
        return accuracy(
            logits_from_features(head, [self._test_feats[i] for i in subset], device=self.device),
            np.asarray(self._test.targets),
        )

    def score_fixed(self, backbones: list[str], fusion) -> float:
        """Held-out accuracy of a fixed configuration (candidate labels + a fusion), trained as fit() trains it:
        for comparisons in reports (after :meth:`score_held_out`)."""
        if self._test is None:
            raise DataError("score_fixed needs the held-out data: run the search with test=...")
        by_label = {c.label: i for i, c in enumerate(self.candidates)}
        missing = [b for b in backbones if b not in by_label]
        if missing:
            raise ConfigError(f"not among the searched candidates: {missing}; candidates: {list(by_label)}")
        fusion = {"name": fusion} if isinstance(fusion, str) else dict(fusion)
        return self._held_out([by_label[b] for b in backbones], fusion)

    def fit(self, train, *, cache_dir=None, use_cache: bool = True, progress: bool = False, log=print, **options):
        """The winner built and trained on the training data exactly as ``fusion-engine train --config
        WINNER --seed S`` trains it (same split, same seeds); returns ``(model, history)``."""
        torch.manual_seed(self.train_config.seed)
        model = self.engine.build(self.winner_config, class_names=self.class_names)
        history = fit_model(
            model,
            train,
            config=self.train_config,
            cache_dir=cache_dir,
            use_cache=use_cache,
            progress=progress,
            log=log,
            **options,
        )
        history["search"] = self.to_dict()
        model.history = history
        return model, history

    def save(self, model, folder, **options) -> Path:
        """``model.save(folder)``, plus ``folder.config.json`` (the winner's config, to rerun or edit) and
        ``folder.search.json`` (the leaderboard) beside the folder; the manifest's history keeps the
        leaderboard too. ``options`` go to ``model.save`` (``metrics``, ``encryption_key``, ``signing_key``)."""
        if isinstance(model.history, dict):
            model.history["search"] = self.to_dict()
        out = model.save(folder, **options)
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
