"""``FusionClassifier``: a fused image classifier as a scikit-learn estimator (fit, predict, clone, pipelines).

It builds the fused model with ``Engine.from_plugins().build(config, class_names=...)`` and trains it
with ``FusedClassifier.fit``, so a fitted estimator holds an ordinary fused model (``model_``) that
saves, evaluates and exports like any other.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from fusion_engine.api.engine import Engine
from fusion_engine.core.data import image_batch, load_dataset
from fusion_engine.core.defaults import default_config
from fusion_engine.core.input_size import sized_to_data
from fusion_engine.core.network import input_size_for
from fusion_engine.errors import ConfigError, DataError
from fusion_engine.training.config import seed_everything

_TABULAR = "it fits on generic 2-D tabular X (rows of features), which is not a batch of images"
CHECKS_THAT_CANNOT_APPLY = {
    **{
        name: _TABULAR
        for name in (
            "check_fit_score_takes_y",
            "check_estimators_overwrite_params",
            "check_dont_overwrite_parameters",
            "check_estimators_fit_returns_self",
            "check_readonly_memmap_input",
            "check_estimators_dtypes",
            "check_dtype_object",
            "check_pipeline_consistency",
            "check_estimators_nan_inf",
            "check_estimators_pickle",
            "check_f_contiguous_array_estimator",
            "check_classifier_data_not_an_array",
            "check_classifiers_classes",
            "check_classifiers_train",
            "check_supervised_y_2d",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_dict_unchanged",
            "check_fit_idempotent",
            "check_fit_check_is_fitted",
            "check_fit2d_predict1d",
        )
    },
    "check_n_features_in": _TABULAR + "; and there is no n_features_in_: images are not rows of features",
    "check_n_features_in_after_fitting": _TABULAR + "; and there is no n_features_in_: images are not rows of features",
    "check_fit2d_1feature": _TABULAR + "; it wants the tabular message '1 feature(s)'",
    "check_estimators_empty_data_messages": "empty X is refused (a ValueError), but the check then wants the tabular "
    "message '0 feature(s)' for X of shape (12, 0)",
    "check_positive_only_tag_during_fit": _TABULAR + " (iris); negative pixels are refused, with a message about the "
    "pixel range rather than the 'Negative values in data' it looks for",
}
"""scikit-learn's ``check_estimator`` checks that cannot apply to an image classifier, with the reason.
``tests/test_sklearn.py`` runs the suite and requires every other check to pass, and each of these to
fail for this reason; it tests their image equivalents separately."""

DEFAULT_BRANCHES = 2
"""The default config keeps the first two backbones of ``core.defaults.default_config``: small and fast."""


class FusionClassifier(ClassifierMixin, BaseEstimator):
    """A fused image classifier with scikit-learn's interface.

    ``X`` holds images: an array or tensor (N, H, W) grey, (N, H, W, C) or (N, C, H, W) with C = 1, 3
    or 4 (uint8 0..255 or float 0..1), or a list of images in any form ``FusedClassifier.predict``
    takes (PIL images, file paths, arrays; sizes may differ: they are resized to the model's input
    size). The first axis of an array is always the images, as in scikit-learn. ``y`` holds labels of
    any sortable type; ``classes_`` is their sorted set and ``predict`` returns them.

    Parameters (stored as given; nothing is checked or built before ``fit``):

    - ``config``: the fused model (dict, file path or ``FusedModelConfig``; ``num_classes`` is taken
      from ``y``). None: the first two backbones of ``fusion_engine.core.defaults.default_config``
      (indexed local weights when a weights folder is set, else hub weights when the hub answers, else
      random initialisation, which ``Engine.build`` warns about); ``config_`` records the one used.
    - ``mode``, ``epochs``, ``lr``, ``batch_size``, ``seed``, ``device``, ``baselines``: training
      options (``fusion_engine.training.config.TrainConfig``); ``baselines`` is off by default here.
    - ``train_options``: a dict of any other TrainConfig option (``{"patience": 4}``); misspelt names
      are a ConfigError with a close match.
    - ``cache_dir``, ``use_cache``: the feature cache (frozen mode); ``progress``: print progress.

    Fitted attributes: ``model_`` (the trained ``FusedClassifier``: ``model_.save(folder)``),
    ``classes_``, ``config_``, ``history_``. There is no ``n_features_in_``: images are not rows of
    features, and their size may vary (every image is resized to the model's input size).

    scikit-learn's ``check_estimator``: the estimator declares image input (tags
    ``three_d_array=True``, ``two_d_array=False``, ``positive_only=True``), so ``check_estimator``
    alone skips every check. ``tests/test_sklearn.py`` runs the whole suite with the 2-D tag forced on
    and requires every check to pass (clone, get/set_params, nothing set in ``__init__``, unfitted
    predict, one label, regression target, NaN in y, y required, sparse input refused, 1-D X refused,
    ...) except those in ``CHECKS_THAT_CANNOT_APPLY``, which must fail on 2-D input:

    - they fit on generic 2-D tabular X (rows of features), which is not a batch of images:
      check_fit_score_takes_y, check_estimators_overwrite_params, check_dont_overwrite_parameters,
      check_estimators_fit_returns_self, check_readonly_memmap_input, check_estimators_dtypes,
      check_dtype_object, check_pipeline_consistency, check_estimators_nan_inf, check_estimators_pickle,
      check_f_contiguous_array_estimator, check_classifier_data_not_an_array, check_classifiers_classes,
      check_classifiers_train, check_supervised_y_2d, check_methods_sample_order_invariance,
      check_methods_subset_invariance, check_dict_unchanged, check_fit_idempotent,
      check_fit_check_is_fitted, check_fit2d_predict1d;
    - and also want ``n_features_in_``, which images do not have: check_n_features_in,
      check_n_features_in_after_fitting;
    - and also want tabular messages: check_fit2d_1feature ("1 feature(s)"),
      check_estimators_empty_data_messages ("0 feature(s)" for X of shape (12, 0); empty X itself is
      refused as asked), check_positive_only_tag_during_fit ("Negative values in data"; negative
      pixels are refused with a message about the pixel range).

    The test file runs the image equivalents of these: fit returns self and changes no parameter, fit
    is idempotent, y as a column warns and works, pickling, string classes, lists, tensors and file
    paths instead of arrays, subset and order invariance, predict leaves the estimator unchanged,
    NaN and out-of-range pixels refused, Pipeline and cross_val_score.
    """

    def __init__(
        self,
        config=None,
        *,
        mode: str = "frozen",
        epochs: int = 40,
        lr: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
        device: str = "auto",
        baselines: bool = False,
        train_options: dict | None = None,
        cache_dir=None,
        use_cache: bool = True,
        progress: bool = False,
    ):
        self.config = config
        self.mode = mode
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.baselines = baselines
        self.train_options = train_options
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.progress = progress

    def fit(self, X, y):
        """Build the fused model for ``y``'s classes and train it on the images ``X``; returns self."""
        X = _as_input(X)
        classes, targets = _encode_labels(y)
        n = _count_images(X)
        if n != len(targets):
            raise DataError(f"X has {n} images but y has {len(targets)} labels; give one label per image")
        names = _class_names(classes)
        images = image_batch(X, batch=True) if _is_array(X) else None  # an array is checked before anything is built
        options = self._train_options()
        seed_everything(self.seed)
        config = self._config()
        if images is not None:  # small images: the branches' input size follows them (core.input_size)
            config = sized_to_data(config, load_dataset((images, targets), classes=names))
        model = Engine.from_plugins().build(config, class_names=names)
        if images is None:  # a list: images of mixed sizes are resized to the model's input size
            images = image_batch(X, size=input_size_for(model), batch=True)
        data = load_dataset((images, targets), classes=names)
        log = print if self.progress else _quiet
        history = model.fit(
            data, cache_dir=self.cache_dir, use_cache=self.use_cache, progress=self.progress, log=log, **options
        )
        self.model_ = model
        self.classes_ = classes
        self.config_ = model.config
        self.history_ = history
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, len(classes_)), columns in the order of ``classes_``."""
        check_is_fitted(self)
        images = image_batch(_as_input(X), size=input_size_for(self.model_), batch=True)
        return self.model_.predict_proba(images, batch_size=self.batch_size)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each image, as a label from ``classes_``."""
        probabilities = self.predict_proba(X)  # first: NotFittedError before classes_ is read
        return self.classes_[np.argmax(probabilities, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.positive_only = True  # pixels: uint8 0..255 or float 0..1
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"X_types": ["3darray"], "requires_y": True}

    def _train_options(self) -> dict:
        options = {
            "mode": self.mode,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device,
            "baselines": self.baselines,
        }
        extra = dict(self.train_options or {})
        clash = sorted(set(extra) & set(options))
        if clash:
            raise ConfigError(
                f"train_options sets {', '.join(repr(k) for k in clash)}, which FusionClassifier takes as a "
                "parameter of its own; set it there (FusionClassifier(epochs=...)) and drop it from train_options"
            )
        return {**options, **extra}

    def _config(self):
        if self.config is not None:
            return self.config
        config, _ = default_config()
        return {**config, "backbones": config["backbones"][:DEFAULT_BRANCHES]}


def _quiet(*args, **kwargs) -> None:
    pass


def _as_input(X):
    """``X`` as given, or as a numpy array when it is some other array-like; sparse matrices are refused."""
    if issparse(X):
        raise DataError(
            f"X is a sparse {type(X).__name__}; sparse input is not supported: give images as a dense array "
            "(N, H, W[, C]) or a list of images"
        )
    if not isinstance(X, (list, tuple, np.ndarray, torch.Tensor)) and hasattr(X, "__array__"):
        return np.asarray(X)
    return X


def _is_array(X) -> bool:
    return isinstance(X, torch.Tensor) or (isinstance(X, np.ndarray) and X.dtype.kind not in "OUS")


def _count_images(X) -> int:
    if isinstance(X, (str, bytes)) or not hasattr(X, "__len__") or getattr(X, "ndim", 1) == 0:
        raise DataError(
            f"X is a {type(X).__name__}; fit takes many images: an array (N, H, W[, C]) or (N, C, H, W), or a "
            "list of images (PIL images, file paths, arrays)"
        )
    return len(X)


def _encode_labels(y) -> tuple[np.ndarray, np.ndarray]:
    """(classes_ sorted, label index per image); scikit-learn's checks, raised as DataError."""
    if y is None:
        raise DataError("FusionClassifier requires y to be passed, but the target y is None; give one label per image")
    try:
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        classes, targets = np.unique(y, return_inverse=True)
    except (ValueError, TypeError) as e:
        raise DataError(f"{e} (y must hold one class label per image: integers, strings, ...)") from e
    if len(classes) == 0:
        raise DataError("y is empty: fit needs images and one label per image")
    if len(classes) < 2:
        raise DataError(
            f"y has only one class ({classes.tolist()[0]!r}) but a classifier needs at least two classes; "
            "add images of another class"
        )
    return classes, targets.reshape(-1).astype(np.int64)


def _class_names(classes: np.ndarray) -> list[str]:
    names = [str(c) for c in classes]
    return names if len(set(names)) == len(names) else [repr(c) for c in classes]
