"""Let the data choose: backbones and fusion selected by cross-validation on cached features.

``fusion-engine train --search`` and :func:`search` extract every candidate backbone once
(through the feature cache, :mod:`fusion_engine.search.candidates`), then, on the training
data only, select backbones and fusion by cross-validation (:mod:`fusion_engine.search.selection`):

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
   the training data as ``fit()`` would train it; :mod:`fusion_engine.search.result`).

With ``train_blocks`` in the training options, the selection still runs on frozen features (a CV row with top
blocks would cost minutes per fold); the winner's final training then trains its top blocks, so only fusions
trained by gradient are candidates (stacking is listed as invalid, with the reason), and with
``independent_branches`` only fusions with a head per branch (vote).

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

import time
from types import SimpleNamespace

import numpy as np

from fusion_engine.api.engine import Engine
from fusion_engine.core.data import align_classes, load_dataset, stratified_split
from fusion_engine.core.input_size import image_side, max_input_size, sized_spec
from fusion_engine.errors import ConfigError, FusionEngineError
from fusion_engine.search.candidates import (
    DEFAULT_GRID,
    SCREEN_FUSION,
    baseline_features,
    extract_candidates,
    fusion_label,
    load_candidates,
    normalise_grid,
    setting_label,
)
from fusion_engine.search.config import SearchConfig, search_config
from fusion_engine.search.result import SearchResult
from fusion_engine.search.selection import Searcher
from fusion_engine.training.config import TrainConfig, resolve_device, seed_everything
from fusion_engine.training.feature_cache import FeatureCache

TOP_BLOCKS_NEED_GRADIENT = "fitted, not trained by gradient: it cannot train top blocks (--train-blocks)"
INDEPENDENT_NEEDS_BRANCH_HEADS = (
    "one head over all branches: its branches cannot train independently (--independent-branches)"
)


def fusion_has(engine, fusion: dict, trait: str) -> bool:
    """Does ``fusion`` have ``trait``: ``requires_fit`` (fitted, as stacking, rather than trained by gradient) or
    ``branch_heads`` (a head per branch, as vote)? A class factory says so itself; a function factory's fusion is
    built tiny to see, and one that cannot be built that small counts as trained by gradient without branch heads
    (training the winner refuses it with the same reason if that is wrong)."""
    factory = engine.registry.get("fusion", fusion["name"]).factory
    if isinstance(factory, type):
        return bool(getattr(factory, trait, False))
    try:
        built = factory([2, 2], 2, **{k: v for k, v in fusion.items() if k != "name"})
    except Exception:  # noqa: BLE001 - a plugin's factory may refuse sizes this small in any way
        return False
    return bool(getattr(built, trait, False))


def winner_rules(train_config: TrainConfig) -> list[tuple[str, bool, str, str]]:
    """What the winner's final training asks of its fusion, as ``(trait, must have it, why a fusion without it is
    refused, a screening fusion that has it)``; traits as :func:`fusion_has` reads them."""
    rules = []
    if train_config.train_blocks:  # the winner's top blocks train by gradient with its fusion
        rules.append(("requires_fit", False, TOP_BLOCKS_NEED_GRADIENT, "concat"))
    if train_config.independent_branches:  # the winner's branches train apart: a head per branch needed
        rules.append(("branch_heads", True, INDEPENDENT_NEEDS_BRANCH_HEADS, "vote"))
    return rules


def search(
    train,
    candidates=None,
    *,
    test=None,
    engine: Engine | None = None,
    config: SearchConfig | None = None,
    train_config: TrainConfig | None = None,
    fusions=None,
    cache_dir=None,
    use_cache: bool = True,
    progress: bool = False,
    log=print,
    **overrides,
) -> SearchResult:
    """Choose backbones and fusion for ``train`` by cross-validation on cached features.

    ``candidates``: backbone specs (a list), a candidates file, a dict ``{"backbones",
    "fusions"}``, or None for every entry of the local weights index (plus the ``handcrafted``
    backbone when its plugin is installed). ``fusions``: names or
    ``{name: [options, ...]}`` (default: every registered fusion with
    :data:`~fusion_engine.search.candidates.DEFAULT_GRID`).
    ``test``: scored only after the choice, for the report. ``overrides`` set
    :class:`~fusion_engine.search.config.SearchConfig` fields (``time_budget`` in minutes,
    ``max_branches``, ``folds``...); a bad one is a ConfigError.
    ``train_config``: the :class:`~fusion_engine.training.config.TrainConfig` of the final training
    (its seed, split, learning rate and device are used by the search too).
    """
    config = search_config(config, **overrides)  # a bad option is a ConfigError naming it
    train_config = train_config or TrainConfig()
    engine = engine or Engine.from_plugins()
    # as in the default model, classic features may fuse with deep ones: the handcrafted plugin joins the index
    extras = [{"name": "handcrafted"}] if "handcrafted" in engine.registry.names("backbone") else []
    specs, file_fusions = load_candidates(candidates, extras)
    grid = (
        normalise_grid(fusions)
        or file_fusions
        or config.fusions
        or {c.name: DEFAULT_GRID.get(c.name, [{}]) for c in engine.components("fusion")}
    )
    fusion_list, fusion_problems = [], []
    for name, option_sets in grid.items():
        for options in option_sets:
            try:
                engine.registry.get("fusion", name).validate_options(dict(options), f"fusion {name}")
                fusion_list.append({"name": name, **options})
            except FusionEngineError as exc:
                fusion_problems.append({"fusion": fusion_label(name, options), "error": str(exc)})
    rules = winner_rules(train_config)
    for trait, wanted, reason, _ in rules:
        refused = [f for f in fusion_list if fusion_has(engine, f, trait) != wanted]
        fusion_list = [f for f in fusion_list if f not in refused]
        fusion_problems += [{"fusion": setting_label(f), "error": reason} for f in refused]
    if not fusion_list:
        raise ConfigError("no candidate fusion is valid: " + "; ".join(p["error"] for p in fusion_problems))
    if config.screen is not None:
        screen = {"name": config.screen} if isinstance(config.screen, str) else dict(config.screen)
        engine.registry.get("fusion", screen["name"]).validate_options(
            {k: v for k, v in screen.items() if k != "name"}, "screen fusion"
        )
    else:
        screen = dict(SCREEN_FUSION) if "concat" in engine.registry.names("fusion") else dict(fusion_list[0])
        if any(fusion_has(engine, screen, trait) != wanted for trait, wanted, _, _ in rules):
            screen = dict(fusion_list[0])  # a screening row may win: it must train as the winner will
    for trait, wanted, reason, fix in rules:
        if fusion_has(engine, screen, trait) != wanted:
            raise ConfigError(f"screen fusion {setting_label(screen)}: {reason}; screen with {fix}")

    device = resolve_device(train_config.device)
    train = load_dataset(train)
    cap = max_input_size(image_side(train))  # as train sizes its default model: small images not blown up
    specs = [sized_spec(spec, cap) for spec in specs]
    seed_everything(train_config.seed)
    parts = list(stratified_split(train, train_config.val_fraction, train_config.seed))  # fit()'s split
    cache = FeatureCache(cache_dir, enabled=use_cache, runtime=train_config.extract_runtime)  # as fit() extracts
    log(
        f"search: {len(specs)} candidate backbones, {len(fusion_list)} fusion settings "
        f"({', '.join(setting_label(f) for f in fusion_list)}); "
        f"{len(train)} training images, {config.folds}-fold CV"
    )
    start = time.perf_counter()
    cands, skipped = extract_candidates(
        engine,
        specs,
        parts,
        train.classes,
        cache,
        batch_size=train_config.batch_size,
        device=device,
        throughput_images=config.throughput_images,
        num_workers=train_config.num_workers,
        progress=progress,
        log=log,
        seed=train_config.seed,
    )
    if not cands:
        raise ConfigError(
            "no candidate backbone could be built: " + "; ".join(f"{s['candidate']}: {s['error']}" for s in skipped)
        )
    hand, hand_rate = baseline_features(parts, cache) if config.baseline else (None, None)
    extract_seconds = time.perf_counter() - start
    y = np.concatenate([np.asarray(p.targets) for p in parts])
    searcher = Searcher(
        engine,
        cands,
        y,
        len(parts[0]),
        len(train.classes),
        config,
        train_config,
        device,
        log,
        hand=hand,
        hand_rate=hand_rate,
        progress=progress,
    )
    outcome = searcher.run(fusion_list, screen)
    search_seconds = searcher.clock.elapsed
    baseline_start = time.perf_counter()
    if config.baseline:  # a reference row, not a candidate: outside the selection's budget
        searcher.baseline_row()
    log(f"search: {outcome['stopped']}; winner {outcome['winner']['candidate']}")
    rows = list(searcher.rows.values())
    timing = {
        "extract_seconds": round(extract_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "budget_seconds": config.time_budget * 60 if config.time_budget else None,
        "budget_exhausted": searcher.clock.exhausted,
        "longest_fold_seconds": round(searcher.longest_fold, 3),
        "evaluations": sum(r["cv_mean"] is not None for r in rows),
        "skipped_for_budget": len(searcher.skipped_for_budget),
        "baseline_seconds": round(time.perf_counter() - baseline_start, 3) if config.baseline else None,
        "cached_backbones": sum(c.cached for c in cands),
    }
    result = SearchResult(
        rows=rows,
        winner=outcome["winner"],
        steps=outcome["steps"],
        stopped=outcome["stopped"],
        skipped=skipped,
        fusions={
            "tried": [setting_label(f) for f in fusion_list],
            "invalid": fusion_problems,
            "screen": setting_label(screen),
        },
        timing=timing,
        class_names=list(train.classes),
        candidates=cands,
        parts=parts,
        searcher=searcher,
        engine=engine,
        config=config,
        train_config=train_config,
        cache=cache,
        device=device,
    )
    if test is not None and config.held_out:  # only now, after the choice, is the test data read
        test = align_classes(SimpleNamespace(class_names=list(train.classes)), load_dataset(test))
        result.score_held_out(
            test, batch_size=train_config.batch_size, num_workers=train_config.num_workers, progress=progress, log=log
        )
    return result
