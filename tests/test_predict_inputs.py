"""FusedClassifier.predict / predict_proba take images in any form (PIL, path, numpy, tensor, lists of
mixed forms and sizes) and give the same answer for the same picture; bad input is a DataError that says
what was given and what is accepted; predict before fit is a NotFittedError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits
from PIL import Image

import fusion_engine
from fusion_engine import DataError, Engine, FusionEngineError, NotFittedError
from fusion_engine.core.data import image_batch, load_dataset
from fusion_engine.core.network import input_size_for

RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}
EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32, "pretrained": False}
QUIET = {"progress": False, "log": lambda *a, **k: None, "baselines": False, "use_cache": False}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture(scope="module")
def model(engine):
    torch.manual_seed(0)
    clf = engine.build({"backbones": [RESNET, EFFNET], "fusion": "concat"}, class_names=CLASSES)
    clf.fit(load_dataset(four_digits(120), classes=CLASSES), epochs=2, **QUIET)
    return clf


@pytest.fixture(scope="module")
def pictures():
    """Three RGB uint8 pictures of different sizes (none at the model's 32x32 input size)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(20, 24, 3), (40, 30, 3), (9, 9, 3)]]


def one(model, image) -> np.ndarray:
    p = model.predict_proba(image)
    assert p.shape == (1, len(CLASSES)), p.shape
    return p[0]


# --- every form of one image gives the same answer ------------------------------------------------------


def test_one_image_in_every_form_gives_one_identical_prediction(model, pictures, tmp_path):
    hwc = pictures[0]
    expected = one(model, hwc)
    path = tmp_path / "picture.png"
    Image.fromarray(hwc).save(path)
    forms = {
        "PIL": Image.fromarray(hwc),
        "path str": str(path),
        "Path": path,
        "float HWC": hwc / 255.0,
        "numpy CHW": np.ascontiguousarray(hwc.transpose(2, 0, 1)),
        "tensor CHW": torch.from_numpy(hwc).permute(2, 0, 1),
        "tensor float CHW": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
        "batch of one": hwc[None],
        "list of one": [hwc],
        "nested lists": hwc.tolist(),
        "RGBA, opaque": np.concatenate([hwc, np.full((*hwc.shape[:2], 1), 255, np.uint8)], axis=2),
    }
    for name, form in forms.items():
        np.testing.assert_allclose(one(model, form), expected, atol=1e-5, err_msg=name)
        assert model.predict(form).shape == (1,), name
    assert model.predict(hwc)[0] == expected.argmax()


def test_grey_images_as_hw_pil_and_channel_axis_agree(model):
    grey = np.random.default_rng(1).integers(0, 256, size=(12, 16), dtype=np.uint8)
    expected = one(model, grey)
    for form in [Image.fromarray(grey), grey[..., None], grey[None], torch.from_numpy(grey)[None]]:
        np.testing.assert_allclose(one(model, form), expected, atol=1e-5)
    np.testing.assert_allclose(one(model, np.repeat(grey[..., None], 3, axis=2)), expected, atol=1e-5)


def test_transparent_pixels_are_white_as_when_a_file_is_read(model, tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[:5, :, :3], rgba[:5, :, 3] = 30, 255  # top half dark and opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = rgba[..., :3].copy()
    white[5:] = 255
    np.testing.assert_allclose(one(model, rgba), one(model, white), atol=1e-5)
    np.testing.assert_allclose(one(model, tmp_path / "a.png"), one(model, white), atol=1e-5)


def test_a_list_mixes_forms_and_sizes_and_each_row_is_that_image_alone(model, pictures, tmp_path):
    Image.fromarray(pictures[1]).save(tmp_path / "b.png")
    grey = pictures[2][..., 0]
    mixed = [Image.fromarray(pictures[0]), tmp_path / "b.png", grey, torch.from_numpy(pictures[2]).permute(2, 0, 1)]
    p = model.predict_proba(mixed)
    assert p.shape == (4, len(CLASSES))
    alone = [pictures[0], pictures[1], grey, pictures[2]]
    for row, image in zip(p, alone):
        np.testing.assert_allclose(row, one(model, image), atol=1e-5)
    np.testing.assert_array_equal(model.predict(mixed), p.argmax(axis=1))
    same = model.predict_proba(np.array([str(tmp_path / "b.png")] * 2))  # an array of paths
    np.testing.assert_allclose(same, np.stack([p[1], p[1]]), atol=1e-5)
    objects = np.empty(2, dtype=object)
    objects[:] = [pictures[0], Image.fromarray(pictures[1])]
    np.testing.assert_allclose(model.predict_proba(objects), p[:2], atol=1e-5)


def test_a_batch_and_the_list_of_its_images_agree(model):
    x, _ = four_digits(10)
    batch = model.predict_proba(x)  # (N, H, W) grey batch, as before
    assert batch.shape == (10, len(CLASSES))
    np.testing.assert_allclose(model.predict_proba(list(x)), batch, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(torch.from_numpy(x)[:, None]), batch, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(x[..., None] / 255.0, batch_size=3), batch, atol=1e-5)
    assert model.predict(x).shape == (10,)


def test_a_3d_array_reads_as_one_image_when_an_axis_holds_channels(model):
    x, _ = four_digits(3)
    assert model.predict_proba(x).shape == (1, len(CLASSES))  # (3, 8, 8): one RGB image, channels first
    assert model.predict_proba(x[..., None]).shape == (3, len(CLASSES))  # (3, 8, 8, 1): three grey images
    assert model.predict_proba(list(x)).shape == (3, len(CLASSES))
    assert image_batch(x, batch=True).shape == (3, 1, 8, 8)  # scikit-learn's X: the first axis is images
    assert model.predict_proba(four_digits(5)[0]).shape == (5, len(CLASSES))  # (5, 8, 8): five grey images


def test_images_are_resized_to_the_input_size_before_batching(model, pictures):
    assert image_batch(pictures, size=input_size_for(model)).shape == (3, 3, 32, 32)
    assert image_batch(pictures[0]).shape == (1, 3, 20, 24)
    assert image_batch([]).shape[0] == 0 and model.predict_proba([]).shape == (0, len(CLASSES))
    with pytest.raises(DataError, match=r"differ in size \(9x9, 20x24, 40x30\)"):
        image_batch(pictures)


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_input_says_what_was_given_and_what_is_accepted(model, pictures, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = [
        (42, r"cannot read images from a int; give a PIL image, an image file path"),
        ("no-such.png", r"image file .*no-such\.png does not exist"),
        (tmp_path, r"is a folder; give the path of an image file"),
        (tmp_path / "broken.png", r"cannot read image file .*broken\.png"),
        ([pictures[0], 3.5, pictures[1]], r"item 1 of the list is a float; expected one image: a PIL image"),
        ([pictures[0], np.zeros((5, 8, 8))], r"item 1 of the list has shape \(5, 8, 8\), which is not one image"),
        (np.zeros(7), r"shape \(7,\); give a PIL image"),
        (np.zeros((2, 8, 8, 5)), r"no channel axis"),
        (np.full((8, 8), 3.0), r"the image: float pixels must lie in \[0, 1\], found values in \[3, 3\]"),
        (np.full((8, 8), np.nan), r"NaN or infinite"),
        (np.zeros((8, 8), dtype=bool), r"the images: dtype bool; expected uint8"),
        ({"x": 1}, r"cannot read images from a dict"),
    ]
    for given, message in cases:
        with pytest.raises(DataError, match=message):
            model.predict(given)
    with pytest.raises(DataError) as info:
        model.predict("a.png")
    assert "dtype" not in str(info.value) and "<U" not in str(info.value)


# --- predict before fit ------------------------------------------------------------------------------------


def test_predict_before_fit_is_not_fitted_error_and_fit_or_load_makes_it_fitted(engine, tmp_path):
    torch.manual_seed(0)
    clf = engine.build({"backbones": [RESNET], "fusion": "concat"}, class_names=CLASSES)
    assert clf.fitted is False
    x, y = four_digits(60)
    for method in (clf.predict, clf.predict_proba):
        with pytest.raises(NotFittedError, match=r"call fit\(data\) first, or load a trained model") as info:
            method(x)
        assert isinstance(info.value, (FusionEngineError, ValueError, AttributeError))
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    clf.fit(load_dataset((x, y), classes=CLASSES), epochs=1, **QUIET)
    assert clf.fitted is True and clf.predict(x).shape == (60,)
    clf.save(tmp_path / "run")
    loaded = fusion_engine.load(tmp_path / "run", engine=engine)
    assert loaded.fitted is True
    np.testing.assert_allclose(loaded.predict_proba(x), clf.predict_proba(x), atol=1e-6)


def test_a_stacking_fusion_fitted_directly_may_predict(engine):
    clf = engine.build({"backbones": [RESNET], "fusion": {"name": "stacking", "folds": 2}}, class_names=CLASSES)
    x, y = four_digits(40)
    with pytest.raises(NotFittedError):
        clf.predict(x)
    with torch.no_grad():
        features = [f.numpy() for f in clf.eval().branch_features(image_batch(x, size=input_size_for(clf)))]
    clf.fusion.fit(features, y)
    assert clf.fitted is False and clf.predict(x).shape == (40,)
