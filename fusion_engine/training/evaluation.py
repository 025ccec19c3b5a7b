"""Evaluate a fused model on held-out data: fused vs each branch's probe vs handcrafted baseline.

:func:`evaluate` returns an :class:`EvaluationReport`: the metrics as a dict (as before), the table when
printed, and the fused model's probabilities per image with the images themselves (for the HTML page).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch

from fusion_engine.core.data import align_classes, load_dataset
from fusion_engine.training.baselines import handcrafted_for
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.metrics import classification_metrics, format_report, paired_difference_se
from fusion_engine.training.views import flip_averaged


class EvaluationReport(dict):
    """The held-out report of :func:`evaluate`.

    A dict of the metrics, so ``report["accuracy"]``, ``report.get("margins")`` and ``json.dumps(report)``
    work as they always did: ``accuracy``, ``macro_f1``, ``n``, ``per_class``, ``confusion_matrix`` of the
    fused model and, when the model has baselines, ``branch_metrics`` and ``baseline_metrics`` (the same
    metrics per branch probe and for the handcrafted baseline), ``branches`` and ``baselines`` (their
    accuracies), ``margins`` (fused minus the best branch, minus handcrafted) and ``margin_se`` (the standard
    error of each margin, paired on the same images). ``print(report)`` shows
    the side-by-side table; :meth:`to_dict` and :meth:`to_json` give the metrics alone.

    Kept beside the metrics, never in the dict (so neither in JSON nor in a saved manifest):
    ``class_names``, ``targets`` (N,), ``probabilities`` (N, K) of the fused model, and ``dataset``, the
    evaluated images in the same order (thumbnails of :meth:`mistakes` come from it).
    """

    def __init__(self, metrics: dict, *, class_names, targets, probabilities, dataset=None):
        super().__init__(metrics)
        self.class_names = list(class_names)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.dataset = dataset

    @property
    def predictions(self) -> np.ndarray:
        """The fused model's predicted class index per image (N,)."""
        return self.probabilities.argmax(axis=1) if len(self.probabilities) else np.zeros(0, dtype=np.int64)

    def mistakes(self, limit: int | None = None) -> list[dict]:
        """The fused model's wrong answers, most confident first: ``index`` (into ``dataset``), ``true`` and
        ``predicted`` class names, ``probability`` of the predicted class, ``true_probability``."""
        predicted = self.predictions
        wrong = np.flatnonzero(predicted != self.targets)
        confidence = self.probabilities[wrong, predicted[wrong]] if len(wrong) else np.zeros(0)
        order = wrong[np.argsort(-confidence, kind="stable")][:limit]
        return [
            {
                "index": int(i),
                "true": self.class_names[self.targets[i]],
                "predicted": self.class_names[predicted[i]],
                "probability": float(self.probabilities[i, predicted[i]]),
                "true_probability": float(self.probabilities[i, self.targets[i]]),
            }
            for i in order
        ]

    def to_dict(self) -> dict:
        """The metrics as plain, JSON-ready dicts and lists (a deep copy)."""
        return copy.deepcopy(dict(self))

    def to_json(self, **options) -> str:
        """The metrics as JSON; ``options`` go to ``json.dumps`` (for example ``indent=2``)."""
        return json.dumps(self.to_dict(), **options)

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        return (
            f"EvaluationReport(accuracy={self['accuracy']:.4f}, macro_f1={self['macro_f1']:.4f}, n={self['n']}; "
            "print() it for the table, to_dict() for every metric)"
        )


@torch.inference_mode()
def logits_from_features(head, features: list[np.ndarray], batch_size: int = 4096, device="cpu") -> np.ndarray:
    """``head(list of feature batches)`` over cached features, in batches; (N, num_classes)."""
    if isinstance(head, torch.nn.Module):
        head.eval()
    out = []
    for start in range(0, len(features[0]), batch_size):
        batch = [torch.from_numpy(np.array(f[start : start + batch_size])).to(device) for f in features]
        out.append(head(batch).float().cpu())
    return torch.cat(out).numpy()


def probe_logits(probe, features: np.ndarray, device="cpu") -> np.ndarray:
    """``probe(features)`` of a one-input module (a branch probe, a branch head), in eval mode and in batches."""
    probe.eval()
    return logits_from_features(lambda batch: probe(batch[0]), [features], device=device)


def evaluate(
    model, data, *, cache: FeatureCache | None = None, batch_size: int = 64, device="cpu", progress: bool = True
) -> EvaluationReport:
    """Accuracy, macro-F1, per-class accuracy and confusion matrix of the fused model, its branches
    (their linear probes) and the handcrafted baseline, on ``data``; see :class:`EvaluationReport`."""
    dataset = align_classes(model, load_dataset(data))
    cache = cache or FeatureCache()
    model.to(device)
    features = cache.features(model, dataset, batch_size=batch_size, device=device, progress=progress)
    fused = features  # what the fusion sees: flip-averaged when the model averages
    if model.config.flip_average:
        fused = flip_averaged(cache, model, dataset, features, batch_size=batch_size, device=device, progress=progress)
    y = dataset.targets
    logits = torch.from_numpy(logits_from_features(model.fusion, fused, device=device)).double()
    probabilities = torch.softmax(logits, dim=1).numpy()
    report = EvaluationReport(
        classification_metrics(y, probabilities.argmax(1), model.class_names),
        class_names=model.class_names,
        targets=y,
        probabilities=probabilities,
        dataset=dataset,
    )
    baselines = getattr(model, "baselines", None)
    if baselines is not None:
        branch_predictions = {
            name: probe_logits(probe, f).argmax(1)
            for name, probe, f in zip(model.branch_names, baselines.probes, features)
        }
        hand = probe_logits(baselines.handcrafted, handcrafted_for(dataset, cache, baselines.kinds)).argmax(1)
        report["branch_metrics"] = {
            name: classification_metrics(y, predicted, model.class_names)
            for name, predicted in branch_predictions.items()
        }
        report["baseline_metrics"] = {"handcrafted": classification_metrics(y, hand, model.class_names)}
        report["branches"] = {k: v["accuracy"] for k, v in report["branch_metrics"].items()}
        report["baselines"] = {k: v["accuracy"] for k, v in report["baseline_metrics"].items()}
        best = max(report["branches"], key=report["branches"].get)
        report["margins"] = {
            "vs_best_branch": report["accuracy"] - report["branches"][best],
            "vs_handcrafted": report["accuracy"] - report["baselines"]["handcrafted"],
        }
        fused = report.predictions
        report["margin_se"] = {
            "vs_best_branch": paired_difference_se(y, fused, branch_predictions[best]),
            "vs_handcrafted": paired_difference_se(y, fused, hand),
        }
    return report
