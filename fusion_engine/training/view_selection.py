"""Frozen training with feature views: which views to train on and whether to flip-average, chosen on validation."""

from __future__ import annotations

import numpy as np

from fusion_engine.artifacts.tensors import state_tensors
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.views import VIEWS, check_views, flip_averaged, stacked, view_features


def fit_with_views(model, cache, train_ds, val_ds, train_feats, val_feats, config, device, train_head, progress):
    """Train ``model.fusion`` on the original rows plus those of ``config.feature_views`` and decide
    ``model.config.flip_average``; "auto" tries no view, each view alone and all of them (and flip
    averaging on and off) and keeps what scores best on the validation data, ties to the simpler.

    ``train_head(head, train_feats, y, val_feats, y_val)`` trains a gradient head (fit's). Returns the
    history entries (``epochs``; ``views`` and ``flip_average``, kept; ``view_scores``: the validation
    accuracy of each setting tried) and the flip-averaged validation features when flip averaging is kept
    (else None)."""
    auto = config.feature_views == "auto"
    views = list(VIEWS) if auto else check_views(config.feature_views)
    options = {"batch_size": config.batch_size, "num_workers": config.num_workers, "device": device}
    extra = view_features(cache, model, train_ds, views, progress=progress, **options)
    averaged = None
    if config.flip_average:
        averaged = flip_averaged(cache, model, val_ds, val_feats, progress=progress, **options)
    combos = [()] + [(v,) for v in views] + ([tuple(views)] if len(views) > 1 else []) if auto else [tuple(views)]
    head, y, y_val = model.fusion, np.asarray(train_ds.targets), np.asarray(val_ds.targets)
    initial, best, scores = state_tensors(head), None, {}
    for combo in combos:
        head.load_state_dict(initial)
        rows = stacked(train_feats, {v: extra[v] for v in combo})
        y_rows = np.concatenate([y] * (1 + len(combo)))
        if getattr(head, "requires_fit", False):
            head.fit(rows, y_rows)
            epochs = []
        else:
            epochs = train_head(head, rows, y_rows, val_feats, y_val)
        tests = [(False, val_feats)] if config.flip_average is not True else []
        tests += [(True, averaged)] if averaged is not None else []
        for flip, feats in tests:
            score = float((logits_from_features(head, feats, device=device).argmax(1) == y_val).mean())
            scores[" + ".join(("original",) + combo) + (", flip-averaged" if flip else "")] = score
            if best is None or score > best[0]:
                best = (score, combo, flip, state_tensors(head), epochs)
    _, combo, flip, state, epochs = best
    head.load_state_dict(state)
    model.config.flip_average = flip
    entries = {"epochs": epochs, "views": list(combo), "flip_average": flip, "view_scores": scores}
    return entries, averaged if flip else None
