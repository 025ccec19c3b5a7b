"""fusion_engine.sklearn.FusionClassifier: scikit-learn's estimator contract on images (clone,
cross_val_score, Pipeline, check_estimator where its checks apply, and their image equivalents where they
cannot), on 240 of scikit-learn's digits with two tiny timm backbones."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from fusion_engine import ConfigError, DataError
from fusion_engine.sklearn import CHECKS_THAT_CANNOT_APPLY, FusionClassifier

CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False},
        {"name": "timm", "model": "test_efficientnet", "input_size": 32, "pretrained": False},
    ],
    "fusion": "concat",
}
NAMES = np.array(["zero", "one", "two", "three"])


def estimator(**params) -> FusionClassifier:
    return FusionClassifier(CONFIG, **{"epochs": 5, "use_cache": False, **params})


@pytest.fixture(scope="module")
def data():
    """240 digits 0-3 as float images (N, 8, 8) in [0, 1], string labels; the first 160 for training."""
    from sklearn.datasets import load_digits

    d = load_digits(n_class=4)
    return d.images[:240] / 16.0, NAMES[d.target[:240]]


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return estimator().fit(X[:160], y[:160])


def scale_to_unit(X):
    """Digits' 0..16 pixels to [0, 1] (a Pipeline step)."""
    return np.asarray(X) / 16.0


# --- the estimator's interface ---------------------------------------------------------------------------


def test_fit_predict_score_with_string_labels(fitted, data):
    X, y = data
    assert list(fitted.classes_) == sorted(NAMES)  # sorted, as scikit-learn orders classes
    assert fitted.model_.class_names == sorted(NAMES) and fitted.model_.fitted
    predicted = fitted.predict(X[160:])
    assert predicted.shape == (80,) and set(predicted) <= set(NAMES)
    proba = fitted.predict_proba(X[160:])
    assert proba.shape == (80, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(fitted.classes_[proba.argmax(axis=1)], predicted)
    assert fitted.score(X[160:], y[160:]) >= 0.6  # chance is 0.25; 0.725 measured
    assert fitted.config_.num_classes == 4 and len(fitted.history_["epochs"]) >= 1
    assert not hasattr(fitted, "n_features_in_")


def test_fit_returns_self_and_changes_no_parameter(data):
    X, y = data
    est = estimator(train_options={"patience": 3})
    params = est.get_params()
    before = set(vars(est))
    assert est.fit(X[:80], y[:80]) is est
    assert est.get_params() == params  # check_dont_overwrite_parameters / check_estimators_overwrite_params
    added = set(vars(est)) - before
    assert added and all(name.endswith("_") and not name.startswith("_") for name in added), added


def test_clone_get_params_set_params(fitted):
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params() and not hasattr(twin, "model_")
    with pytest.raises(NotFittedError):
        twin.predict(np.zeros((2, 8, 8)))
    twin.set_params(epochs=2, train_options={"patience": 1})
    assert twin.get_params()["epochs"] == 2 and fitted.get_params()["epochs"] == 5
    with pytest.raises(ValueError, match="Invalid parameter 'epoch'"):
        twin.set_params(epoch=3)


def test_fit_is_idempotent_and_takes_y_as_a_column(fitted, data):
    X, y = data
    again = clone(fitted)
    with pytest.warns(DataConversionWarning):
        again.fit(X[:160], y[:160, None])  # check_supervised_y_2d: a column vector warns, then works
    np.testing.assert_allclose(again.predict_proba(X[160:]), fitted.predict_proba(X[160:]), atol=1e-6)


def test_cross_val_score_and_pipeline(data):
    X, y = data
    pipe = Pipeline([("scale", FunctionTransformer(scale_to_unit)), ("clf", estimator())])
    scores = cross_val_score(pipe, X * 16, y, cv=3)  # raw digit pixels 0..16, scaled inside the pipeline
    assert scores.shape == (3,) and scores.min() >= 0.5, scores
    pipe.set_params(clf__epochs=3)
    assert pipe.get_params()["clf__epochs"] == 3


def test_pickle_keeps_predictions(fitted, data):
    X, _ = data
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_proba(X[160:]), fitted.predict_proba(X[160:]))


def test_predictions_do_not_depend_on_batch_order_subset_or_form(fitted, data, tmp_path):
    X, _ = data
    test = X[160:200]
    whole = fitted.predict_proba(test)
    order = np.random.default_rng(0).permutation(len(test))
    np.testing.assert_allclose(fitted.predict_proba(test[order]), whole[order], atol=1e-5)
    np.testing.assert_allclose(fitted.predict_proba(test[:7]), whole[:7], atol=1e-5)
    np.testing.assert_allclose(fitted.predict_proba(list(test)), whole, atol=1e-5)  # not an array
    np.testing.assert_allclose(fitted.predict_proba(torch.from_numpy(test)), whole, atol=1e-5)
    as_uint8 = np.round(test * 255).astype(np.uint8)
    paths = []
    for i, image in enumerate(as_uint8[:5]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    np.testing.assert_allclose(fitted.predict_proba(paths), fitted.predict_proba(as_uint8[:5]), atol=1e-6)
    np.testing.assert_allclose(fitted.predict_proba(as_uint8[:5]), whole[:5], atol=1e-2)  # 8-bit rounding
    state = {k: v for k, v in vars(fitted).items() if k != "model_"}
    fitted.predict(test)
    assert {k: v for k, v in vars(fitted).items() if k != "model_"}.keys() == state.keys()  # check_dict_unchanged


def test_fit_on_a_list_of_pil_images_of_mixed_sizes(data):
    X, y = data
    images = [Image.fromarray(np.round(x * 255).astype(np.uint8)).resize((8 + i % 3 * 4,) * 2) for i, x in enumerate(X)]
    est = estimator(epochs=3).fit(images[:120], y[:120])
    assert est.predict(images[120:140]).shape == (20,) and est.score(images[120:], y[120:]) >= 0.5


# --- errors ------------------------------------------------------------------------------------------------


def test_bad_fit_input_is_a_data_error_naming_the_fix(data):
    X, y = data
    est = estimator()
    cases = [
        ((X[:20], np.full(20, "zero")), r"only one class \('zero'\).*at least two classes"),
        ((X[:20], np.linspace(0, 1, 20)), r"Unknown label type"),
        ((X[:20], None), r"requires y to be passed"),
        ((X[:20], y[:19]), r"X has 20 images but y has 19 labels"),
        ((X[:20].reshape(20, 64), y[:20]), r"2-D: one grey image, or rows of tabular features.*X.reshape"),
        ((X[:20] * 16, y[:20]), r"float pixels must lie in \[0, 1\]"),
        (("digits", y[:20]), r"X is a str; fit takes many images"),
        ((np.zeros((0, 8, 8)), []), r"y is empty"),
    ]
    for (features, labels), message in cases:
        with pytest.raises(DataError, match=message):
            est.fit(features, labels)
    assert not hasattr(est, "model_")
    with pytest.raises(ConfigError, match=r"'epoch'.*did you mean 'epochs'"):
        FusionClassifier(CONFIG, train_options={"epoch": 3}, use_cache=False).fit(X[:40], y[:40])
    with pytest.raises(ConfigError, match=r"train_options sets 'epochs'"):
        FusionClassifier(CONFIG, train_options={"epochs": 3}).fit(X[:40], y[:40])


def test_default_config_is_two_indexed_backbones_when_a_weights_folder_is_set(tmp_path, monkeypatch):
    index = {f"net{i}": {"architecture": f"timm:resnet{i}", "file": f"net{i}.safetensors"} for i in range(3)}
    (tmp_path / "index.json").write_text(json.dumps(index))
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(tmp_path))
    config = FusionClassifier()._config()
    assert config["backbones"] == [{"name": "timm", "weights": "net0"}, {"name": "timm", "weights": "net1"}]
    assert FusionClassifier().get_params()["config"] is None  # resolved at fit, never stored in the parameters


# --- scikit-learn's check_estimator ------------------------------------------------------------------------


class _AsIfTabular(FusionClassifier):
    """The same estimator with the 2-D input tag forced on, so that check_estimator runs its checks at all."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags


@pytest.mark.skipif(
    tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 6),
    reason="check_estimator(expected_failed_checks=..., callback=...) needs scikit-learn >= 1.6",
)
def test_check_estimator_passes_every_check_that_applies_to_images():
    from sklearn.utils.estimator_checks import check_estimator

    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(
            _AsIfTabular(CONFIG, epochs=2, use_cache=False),
            expected_failed_checks=CHECKS_THAT_CANNOT_APPLY,
            on_fail=None,
            callback=lambda **result: results.append(result),
        )
    by_status: dict[str, set] = {}
    for r in results:
        by_status.setdefault(r["status"], set()).add(r["check_name"])
    assert not by_status.get("failed"), [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    for r in results:
        if r["check_name"] in CHECKS_THAT_CANNOT_APPLY:  # fails, and for the reason given: 2-D tabular X
            assert r["status"] == "xfail", f"{r['check_name']} passes: take it off CHECKS_THAT_CANNOT_APPLY"
            assert "2-D: one grey image, or rows of tabular features" in str(r["exception"]), r
    assert {
        "check_estimator_cloneable",
        "check_no_attributes_set_in_init",
        "check_get_params_invariance",
        "check_set_params",
        "check_parameters_default_constructible",
        "check_estimators_unfitted",
        "check_classifiers_one_label",
        "check_classifiers_regression_target",
        "check_supervised_y_no_nan",
        "check_requires_y_none",
        "check_estimator_sparse_matrix",
        "check_mixin_order",
    } <= by_status["passed"]
    assert len(by_status["passed"]) >= 20


def test_the_real_tags_declare_image_input():
    from sklearn.utils import get_tags

    tags = get_tags(FusionClassifier()).input_tags
    assert (tags.two_d_array, tags.three_d_array, tags.positive_only) == (False, True, True)


def test_every_check_that_cannot_apply_is_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in CHECKS_THAT_CANNOT_APPLY:
        assert f"`{name}`" in readme, f"README.md does not name {name}"
        assert name in FusionClassifier.__doc__, f"FusionClassifier's docstring does not name {name}"
