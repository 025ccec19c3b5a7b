"""fit() end to end on tiny timm backbones and a digits subset: frozen mode on cached features, the
feature cache (hits, invalidation, no partial files), stacking, early stopping, determinism,
save/load, class mapping in evaluate, and an interrupted fine-tuning run resumed exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits
from safetensors.torch import save_file

import fusion_engine
from fusion_engine import ConfigError, DataError, Engine, FusedClassifier
from fusion_engine.core.data import load_dataset
from fusion_engine.training.config import TrainConfig
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.fit import prepare_data

RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32}
EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32}
QUIET = {"progress": False, "log": lambda *args, **kwargs: None}


@pytest.fixture(scope="module")
def train_data():
    return load_dataset(four_digits(200), classes=CLASSES)


@pytest.fixture(scope="module")
def test_arrays():
    return four_digits(80, offset=200)


@pytest.fixture
def engine():
    return Engine.from_plugins()


def build(engine, seed: int = 0, fusion="concat", backbones=(RESNET, EFFNET)) -> FusedClassifier:
    torch.manual_seed(seed)
    return engine.build({"backbones": list(backbones), "fusion": fusion}, class_names=CLASSES)


def tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# --- frozen mode and the feature cache ---------------------------------------------------------


def test_frozen_fit_trains_only_the_head_and_a_second_run_reads_the_cache(engine, train_data, tmp_path):
    model = build(engine)
    backbones_before = tensors(model.branches)
    head_before = tensors(model.fusion)
    history = model.fit(train_data, cache_dir=tmp_path, epochs=3, baselines=False, **QUIET)
    assert history["mode"] == "frozen" and len(history["epochs"]) == 3
    assert (history["n_train"], history["n_val"]) == (170, 30)
    assert history["cache"]["extracted"] == 4 and history["cache"]["hits"] == 0  # 2 branches x (train, val)
    assert len(list(tmp_path.glob("*.npy"))) == 4
    assert_same_tensors(tensors(model.branches), backbones_before)  # frozen backbones never change
    assert any(not torch.equal(head_before[k], v) for k, v in tensors(model.fusion).items())

    # The same model again: every feature comes from the cache; the backbones are never run.
    again = build(engine)
    for branch in again.branches:
        branch.backbone.forward = branch.backbone.forward_stages = _must_not_run
    history2 = again.fit(train_data, cache_dir=tmp_path, epochs=3, baselines=False, **QUIET)
    assert history2["cache"] == {"hits": 4, "extracted": 0, "extract_seconds": 0.0}
    assert history2["epochs"] == history["epochs"]
    assert_same_tensors(tensors(again.fusion), tensors(model.fusion))


def _must_not_run(*args, **kwargs):
    raise AssertionError("a backbone ran although every feature was cached")


def extract(model, data, cache_dir) -> dict:
    cache = FeatureCache(cache_dir)
    cache.features(model, data, progress=False)
    return {k: cache.stats[k] for k in ("hits", "extracted")}


def test_cache_is_invalidated_by_weights_preprocessing_and_data(engine, train_data, tmp_path):
    cache = tmp_path / "cache"
    assert extract(build(engine), train_data, cache) == {"hits": 0, "extracted": 2}
    assert extract(build(engine), train_data, cache) == {"hits": 2, "extracted": 0}
    # different random seed -> different weights in both branches
    assert extract(build(engine, seed=1), train_data, cache) == {"hits": 0, "extracted": 2}
    # preprocessing of the first branch only (the largest input size, 32, stays the same)
    assert extract(build(engine, backbones=({**RESNET, "input_size": 24}, EFFNET)), train_data, cache) == {
        "hits": 1,
        "extracted": 1,
    }
    assert extract(
        build(engine, backbones=({**RESNET, "mean": [0.4] * 3, "std": [0.3] * 3}, EFFNET)), train_data, cache
    ) == {"hits": 1, "extracted": 1}
    # data: one pixel of one image
    x, y = four_digits(200)
    x = x.copy()
    x[7, 3, 3] ^= 0xFF
    assert extract(build(engine), load_dataset((x, y), classes=CLASSES), cache) == {"hits": 0, "extracted": 2}


def test_cache_is_invalidated_when_a_local_weights_file_changes(engine, train_data, tmp_path):
    weights = tmp_path / "resnet.safetensors"
    source = build(engine).branches[0].backbone.model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    local = ({**RESNET, "weights": str(weights)}, EFFNET)
    assert extract(build(engine, backbones=local), train_data, tmp_path / "cache") == {"hits": 0, "extracted": 2}
    assert extract(build(engine, backbones=local), train_data, tmp_path / "cache") == {"hits": 2, "extracted": 0}
    # same path, other tensors: only the branch with the changed file is extracted again
    save_file(
        {k: (v * 1.01 if v.is_floating_point() else v).contiguous() for k, v in source.state_dict().items()}, weights
    )
    assert extract(build(engine, backbones=local), train_data, tmp_path / "cache") == {"hits": 1, "extracted": 1}


def test_cached_features_equal_fresh_ones_when_another_branch_changes_size(engine, train_data, tmp_path):
    """Images are batched at the largest branch input size, so a branch's features depend on it too:
    the cache must not hand the 48-pixel model's features to the 64-pixel model."""
    small = build(engine, backbones=(RESNET, {**EFFNET, "input_size": 48}))
    large = build(engine, backbones=(RESNET, {**EFFNET, "input_size": 64}))
    FeatureCache(tmp_path).features(small, train_data, progress=False)
    cached = FeatureCache(tmp_path).features(large, train_data, progress=False)
    fresh = FeatureCache(enabled=False).features(large, train_data, progress=False)
    for c, f in zip(cached, fresh):
        np.testing.assert_array_equal(np.asarray(c), f)


def test_interrupted_extraction_leaves_no_partial_cache_file(engine, train_data, tmp_path, monkeypatch):
    import fusion_engine.training.feature_cache as features

    model = build(engine)

    def half_then_interrupt(model, loader, indices, outputs, device, progress, *runtime):
        for out in outputs:
            out[: len(out) // 2] = 1.0
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "run_branches", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path).features(model, train_data, progress=False)
    assert list(tmp_path.iterdir()) == []

    # The disk fills while the second temporary array is created: the first one is removed too.
    made = []
    original = np.lib.format.open_memmap

    def full_disk(*args, **kwargs):
        if made:
            raise OSError(28, "No space left on device")
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(np.lib.format, "open_memmap", full_disk)
    with pytest.raises(OSError, match="No space"):
        FeatureCache(tmp_path).features(model, train_data, progress=False)
    assert made and list(tmp_path.iterdir()) == []


# --- stacking, early stopping, determinism -----------------------------------------------------


def test_stacking_is_fitted_without_gradient_epochs(engine, train_data, tmp_path):
    model = build(engine, fusion="stacking")
    history = model.fit(train_data, cache_dir=tmp_path, baselines=False, **QUIET)
    assert history["epochs"] == []
    assert bool(model.fusion.fitted)
    assert history["val_accuracy"] > 0.6  # 4 classes: chance is 0.25


def test_early_stopping_stops_when_validation_stops_improving(engine, train_data, tmp_path):
    # A learning rate so small that validation accuracy never changes after the first epoch.
    model = build(engine)
    history = model.fit(train_data, cache_dir=tmp_path, epochs=40, patience=2, lr=1e-9, baselines=False, **QUIET)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    # With a useful learning rate it runs to the end and keeps the best validation epoch.
    model = build(engine)
    history = model.fit(train_data, cache_dir=tmp_path, epochs=6, patience=50, baselines=False, **QUIET)
    assert len(history["epochs"]) == 6
    assert history["val_accuracy"] == pytest.approx(max(e["val_accuracy"] for e in history["epochs"]), abs=1e-5)


def test_same_seed_same_predictions_and_another_seed_another_split(engine, train_data, test_arrays, tmp_path):
    x_test, _ = test_arrays
    probs = []
    for _ in range(2):
        model = build(engine)
        model.fit(train_data, cache_dir=tmp_path, epochs=3, baselines=False, **QUIET)
        probs.append(model.predict_proba(x_test))
    np.testing.assert_array_equal(probs[0], probs[1])

    def split(seed):
        return prepare_data(build(engine), train_data, None, TrainConfig(seed=seed))

    (train1, val1), (train1b, val1b), (_, val2) = split(1), split(1), split(2)
    assert val1.digest() == val1b.digest() and train1.digest() == train1b.digest()
    assert val1.digest() != val2.digest() and len(val1) == len(val2) == 30
    assert np.bincount(val1.targets).min() >= 7 and np.bincount(val2.targets).min() >= 7  # stratified either way


# --- save / load, evaluate --------------------------------------------------------------------


def test_saved_and_loaded_model_predicts_and_evaluates_identically(engine, train_data, test_arrays, tmp_path):
    x_test, y_test = test_arrays
    test = load_dataset((x_test, y_test), classes=CLASSES)
    model = build(engine)
    history = model.fit(train_data, cache_dir=tmp_path / "cache", epochs=3, **QUIET)
    assert set(history["baselines_val_accuracy"]) == {"timm:test_resnet", "timm:test_efficientnet", "handcrafted"}
    before = model.predict_proba(x_test)
    report = model.evaluate(test, cache=FeatureCache(tmp_path / "cache"), progress=False)
    model.save(tmp_path / "run")

    loaded = fusion_engine.load(tmp_path / "run")
    assert loaded.class_names == CLASSES
    np.testing.assert_array_equal(loaded.predict_proba(x_test), before)
    again = loaded.evaluate(test, cache=FeatureCache(enabled=False), progress=False)
    for key in ("accuracy", "macro_f1", "n", "branches", "baselines", "confusion_matrix"):
        assert again[key] == report[key], key
    assert loaded.history["epochs"] == history["epochs"]


def test_evaluate_maps_classes_by_name_and_refuses_other_classes(engine, train_data, test_arrays, tmp_path):
    x_test, y_test = test_arrays
    model = build(engine)
    model.fit(train_data, cache_dir=tmp_path, epochs=3, **QUIET)
    cache = FeatureCache(tmp_path)
    report = model.evaluate(load_dataset((x_test, y_test), classes=CLASSES), cache=cache, progress=False)
    # The same images, with the class list in another order and labels numbered by it.
    reordered = CLASSES[::-1]
    y_other = np.array([reordered.index(CLASSES[label]) for label in y_test])
    remapped = model.evaluate(load_dataset((x_test, y_other), classes=reordered), cache=cache, progress=False)
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "branches", "baselines"):
        assert remapped[key] == report[key], key
    with pytest.raises(DataError, match=r"classes .*differ from the model's"):
        model.evaluate(
            load_dataset((x_test, y_test), classes=["zero", "one", "two", "seven"]), cache=cache, progress=False
        )


# --- progress, phase times, baselines ---------------------------------------------------------

PHASE_LINE = r"^(?P<label>.+): (?P<count>\d+/\d+) (?P<unit>\w+) in \d+\.\d s \([^)]*\)(; .+)?$"


def phase_lines(err: str) -> list[tuple[str, str, str]]:
    """(label, count, unit) of every stderr line; each must be a phase's one end line."""
    import re

    out = []
    for line in err.splitlines():
        match = re.match(PHASE_LINE, line)
        assert match, f"not a phase line: {line!r}"
        out.append((match["label"], match["count"], match["unit"]))
    return out


def assert_phases_add_up(history: dict, expected: set[str]):
    phases = history["phase_seconds"]
    assert set(phases) == expected
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(history["seconds"], abs=0.001 * len(phases))  # rounding only


def test_frozen_fit_shows_one_line_per_phase_and_its_phases_add_up(engine, train_data, tmp_path, capsys):
    model = build(engine)
    history = model.fit(train_data, cache_dir=tmp_path, epochs=3, progress=True, log=lambda *a, **k: None)
    branches = "extracting timm:test_resnet, timm:test_efficientnet"
    assert phase_lines(capsys.readouterr().err) == [
        (branches, "170/170", "img"),  # training split, then validation split, both branches in one pass
        (branches, "30/30", "img"),
        ("handcrafted features (hog, color)", "170/170", "img"),
        ("handcrafted features (hog, color)", "30/30", "img"),
        ("head training", "3/3", "epoch"),
        ("baselines (linear probes)", "3/3", "probe"),
    ]
    assert_phases_add_up(history, {"data", "extraction", "head", "baselines", "other"})
    assert history["head_seconds"] == history["phase_seconds"]["head"]

    # quiet: nothing on stderr; every feature cached now, no baselines: their phase is absent
    history = build(engine).fit(train_data, cache_dir=tmp_path, epochs=3, baselines=False, **QUIET)
    assert capsys.readouterr().err == ""
    assert_phases_add_up(history, {"data", "extraction", "head", "other"})


def test_finetune_shows_one_line_for_its_epochs(engine, tmp_path, capsys):
    data = load_dataset(four_digits(64), classes=CLASSES)
    history = build(engine).fit(
        data, mode="finetune", epochs=1, batch_size=32, baselines=False, cache_dir=tmp_path, progress=True, log=print
    )
    captured = capsys.readouterr()
    lines = phase_lines(captured.err)
    assert lines[0][:2] == ("fine-tuning", "1/1") and lines[0][2] == "epoch"  # the batch bar is transient
    assert [label for label, _, _ in lines[1:]] == ["extracting timm:test_resnet, timm:test_efficientnet"] * 2
    assert "epoch 1: loss" in captured.out
    assert_phases_add_up(history, {"data", "finetune", "extraction", "head", "other"})


def test_fit_without_baselines_drops_earlier_probes_and_evaluates_the_fused_model_alone(
    engine, train_data, test_arrays, tmp_path
):
    model = build(engine)
    model.fit(train_data, cache_dir=tmp_path, epochs=2, **QUIET)
    assert model.baselines is not None
    model.fit(train_data, cache_dir=tmp_path, epochs=2, baselines=False, **QUIET)
    assert model.baselines is None  # probes of the earlier head would not describe this one
    report = model.evaluate(load_dataset(test_arrays, classes=CLASSES), cache=FeatureCache(tmp_path), progress=False)
    assert 0 <= report["accuracy"] <= 1 and "branches" not in report and "baselines" not in report


def test_probe_path_keeps_the_best_validation_solution_and_stops_once_accuracy_falls():
    from sklearn.datasets import load_digits

    from fusion_engine.core.probes import C_PATH, LinearProbe, fit_logistic
    from fusion_engine.training.baselines import fit_tuned

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_fit, y_fit, x_val, y_val = x[:300], y[:300], x[300:600], y[300:600]
    probe = LinearProbe(64, 10)
    path = probe.fit_path(x_fit, y_fit, x_val, y_val)
    scores = list(path.scores.values())
    assert list(path.scores) == list(C_PATH)[: len(scores)]  # increasing C, a prefix of the grid
    assert all(a <= b for a, b in zip(scores[:-1], scores[1:-1]))  # rising until the last one fitted
    if len(scores) < len(C_PATH):  # stopped early: only because the last one fell below the best
        assert scores[-1] < max(scores)
    assert path.accuracy == max(scores) and path.scores[path.C] == path.accuracy
    # the probe holds that solution (no refit): its own predictions score exactly that
    assert (probe.predict_proba(x_val).argmax(1) == y_val).mean() == pytest.approx(path.accuracy)
    # as good as a cold fit at the chosen C (the same optimum, reached from a warm start)
    cold = LinearProbe(64, 10).fit(x_fit, y_fit, C=path.C)
    assert abs((cold.predict_proba(x_val).argmax(1) == y_val).mean() - path.accuracy) <= 0.02
    assert fit_tuned(LinearProbe(64, 10), x_fit, y_fit, x_val, y_val) == path.accuracy
    # classes absent from the training labels keep a very low bias, as fit_logistic gives them
    few = y_fit < 3
    path3 = LinearProbe(64, 10).fit_path(x_fit[few], y_fit[few], x_val, y_val)
    coef, intercept, _, _ = fit_logistic(x_fit[few], y_fit[few], 10, C=path3.C)
    assert (path3.intercept[3:] == intercept[3:]).all() and (path3.intercept[3:] < -1e3).all()
    assert (path3.coef[3:] == 0).all() and (path3.coef[:3] != 0).any()


def test_the_path_minimises_scikit_learns_logistic_regression_objective():
    """Fitted to a tight tolerance, one C of the path is scikit-learn's LogisticRegression(C) (the oracle)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from fusion_engine.core.probes import LinearProbe, standardise

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    for labels in (y, np.where(y < 5, 0, 1)):  # multinomial, and two classes (sklearn keeps one row there)
        probe = LinearProbe(64, int(labels.max()) + 1)
        probe.fit_path(x[:600], labels[:600], x[600:900], labels[600:900], Cs=(0.5,), max_iter=5000, tol=1e-7)
        xs, _, _ = standardise(x[:600])
        oracle = LogisticRegression(C=0.5, tol=1e-8, max_iter=5000).fit(xs, labels[:600])
        xs_val = (x[600:900] - probe.mean.numpy()) / probe.scale.numpy()
        np.testing.assert_allclose(probe.predict_proba(x[600:900]), oracle.predict_proba(xs_val), atol=2e-3)


# --- fine-tuning: interrupt and resume ---------------------------------------------------------


def test_interrupted_finetune_resumes_to_the_uninterrupted_result(engine, tmp_path, monkeypatch):
    import fusion_engine.training.finetune as finetune

    data = load_dataset(four_digits(96), classes=CLASSES)
    options = dict(mode="finetune", epochs=2, batch_size=32, baselines=False, cache_dir=tmp_path / "cache", **QUIET)

    reference = build(engine)
    expected = reference.fit(data, checkpoint_dir=tmp_path / "ck-ref", **options)
    assert [e["epoch"] for e in expected["epochs"]] == [1, 2]

    original = finetune._save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build(engine).fit(data, checkpoint_dir=tmp_path / "ck", **options)
    monkeypatch.setattr(finetune, "_save_checkpoint", original)
    assert (tmp_path / "ck" / "state.json").is_file()

    resumed = build(engine, seed=123)  # the checkpoint, not the initial weights, decides
    history = resumed.fit(data, checkpoint_dir=tmp_path / "ck", resume=True, **options)
    assert history["epochs"] == expected["epochs"]
    assert_same_tensors(tensors(resumed), tensors(reference))

    with pytest.raises(ConfigError, match="no checkpoint"):
        build(engine).fit(data, checkpoint_dir=tmp_path / "nothing-here", resume=True, **options)


def test_a_misspelt_fit_option_is_an_error_with_a_suggestion(engine):
    model = build(engine)
    with pytest.raises(ConfigError, match=r"unknown option 'epoch' \(did you mean 'epochs'\?\)\. Valid options: mode"):
        model.fit("digits", epoch=3)
    with pytest.raises(ConfigError, match=r"option 'epochs': Input should be greater than or equal to 1 \(got 0\)"):
        model.fit("digits", epochs=0)
