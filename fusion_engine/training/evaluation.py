"""Evaluate a fused model on held-out data: fused vs each branch's probe vs handcrafted baseline."""

from __future__ import annotations

import numpy as np
import torch

from fusion_engine.core.data import align_classes, load_dataset
from fusion_engine.training.baselines import handcrafted_for
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.metrics import classification_metrics


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


def probe_logits(probe, features: np.ndarray) -> np.ndarray:
    probe.eval()
    return logits_from_features(lambda batch: probe(batch[0]), [features])


def evaluate(
    model, data, *, cache: FeatureCache | None = None, batch_size: int = 64, device="cpu", progress: bool = True
) -> dict:
    """Accuracy, macro-F1, per-class accuracy and confusion matrix of the fused model, its branches
    (their linear probes) and the handcrafted baseline, on ``data``."""
    dataset = align_classes(model, load_dataset(data))
    cache = cache or FeatureCache()
    model.to(device)
    features = cache.features(model, dataset, batch_size=batch_size, device=device, progress=progress)
    y = dataset.targets
    report = classification_metrics(
        y, logits_from_features(model.fusion, features, device=device).argmax(1), model.class_names
    )
    baselines = getattr(model, "baselines", None)
    if baselines is not None:
        report["branch_metrics"] = {
            name: classification_metrics(y, probe_logits(probe, f).argmax(1), model.class_names)
            for name, probe, f in zip(model.branch_names, baselines.probes, features)
        }
        hand = handcrafted_for(dataset, cache, baselines.kinds)
        report["baseline_metrics"] = {
            "handcrafted": classification_metrics(
                y, probe_logits(baselines.handcrafted, hand).argmax(1), model.class_names
            )
        }
        report["branches"] = {k: v["accuracy"] for k, v in report["branch_metrics"].items()}
        report["baselines"] = {k: v["accuracy"] for k, v in report["baseline_metrics"].items()}
        report["margins"] = {
            "vs_best_branch": report["accuracy"] - max(report["branches"].values()),
            "vs_handcrafted": report["accuracy"] - report["baselines"]["handcrafted"],
        }
    return report
