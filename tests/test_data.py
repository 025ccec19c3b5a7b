"""Tests of fusion_engine.core.data: every source kind, digests, bad-data errors, splits, collation."""

import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_engine.core.data import (
    MAX_CLASSES,
    SAMPLES,
    ImageDataset,
    collate_images,
    load_dataset,
    own_test_source,
    stratified_split,
    to_float_images,
)
from fusion_engine.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "data").is_dir(), reason=f"real data folder {SHARED / 'data'} is absent"
)


def noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_folder(root: Path) -> Path:
    """cats: two RGB PNGs and a grey PNG; dogs: a JPEG, a palette GIF with transparency, a hidden file."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "nested").mkdir(parents=True)
    Image.fromarray(noise((12, 10, 3), 1)).save(root / "cats" / "a.png")
    Image.fromarray(noise((12, 10, 3), 2)).save(root / "cats" / "B.PNG")
    Image.fromarray(noise((9, 7), 3), mode="L").save(root / "cats" / "grey.png")
    Image.fromarray(noise((16, 16, 3), 4)).save(root / "dogs" / "nested" / "d.jpg", quality=90)
    gif = Image.fromarray(noise((8, 8), 5) % 4, mode="P")
    gif.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    gif.save(root / "dogs" / "p.gif", transparency=0)
    (root / "dogs" / ".hidden.png").write_bytes(b"not an image")
    (root / "dogs" / "notes.txt").write_text("ignored")
    (root / ".git").mkdir()
    return root


# --- sources -----------------------------------------------------------------------------------


def test_folder_loads_lazily_with_grey_and_rgb(tmp_path):
    ds = load_dataset(write_folder(tmp_path / "pets"))
    assert isinstance(ds, ImageDataset)
    assert ds.classes == ["cats", "dogs"]
    assert ds.targets.dtype == np.int64 and ds.targets.tolist() == [0, 0, 0, 1, 1]
    assert ds.paths == ["cats/B.PNG", "cats/a.png", "cats/grey.png", "dogs/nested/d.jpg", "dogs/p.gif"]
    shapes = [tuple(ds[i][0].shape) for i in range(len(ds))]
    assert shapes == [(3, 12, 10), (3, 12, 10), (1, 9, 7), (3, 16, 16), (3, 8, 8)]
    image, label = ds[2]
    assert image.dtype == torch.uint8 and label == 0
    assert np.array_equal(image[0].numpy(), noise((9, 7), 3))
    gif = ds[4][0]
    transparent = noise((8, 8), 5) % 4 == 0
    assert (gif[:, transparent] == 255).all()  # transparent palette entry composited onto white
    assert "pets" in ds.name


def test_folder_classes_argument_picks_and_orders(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "birds").mkdir()
    Image.fromarray(noise((4, 4, 3))).save(root / "birds" / "b.png")
    ds = load_dataset(root, classes=["dogs", "cats"])
    assert ds.classes == ["dogs", "cats"] and sorted(ds.targets.tolist()) == [0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="fish"):
        load_dataset(root, classes=["cats", "fish"])


def test_arrays_grey_rgb_and_float():
    x = noise((6, 5, 4, 3))
    ds = load_dataset((x, np.array([0, 1, 2, 0, 1, 2])), classes=["a", "b", "c"])
    assert ds.classes == ["a", "b", "c"] and len(ds) == 6
    image, label = ds[1]
    assert image.shape == (3, 5, 4) and image.dtype == torch.uint8 and label == 1
    assert np.array_equal(image.permute(1, 2, 0).numpy(), x[1])

    grey = load_dataset((noise((4, 7, 7)), [0, 1, 0, 1]))
    assert grey.classes == ["0", "1"] and grey[0][0].shape == (1, 7, 7)

    floats = load_dataset((x.astype(np.float64) / 255, np.arange(6) % 2))
    assert torch.equal(floats[3][0], ds[3][0])


def test_npz_with_classes_and_train_test_splits(tmp_path):
    np.savez(tmp_path / "one.npz", x=noise((4, 6, 6)), y=np.array([0, 1, 1, 0]), classes=np.array(["no", "yes"]))
    ds = load_dataset(tmp_path / "one.npz")
    assert ds.classes == ["no", "yes"] and len(ds) == 4
    with pytest.raises(DataError, match="stratified_split"):
        load_dataset(tmp_path / "one.npz", split="test")

    np.savez(
        tmp_path / "two.npz", x_train=noise((4, 6, 6)), y_train=[0, 1, 0, 1], x_test=noise((2, 6, 6)), y_test=[1, 0]
    )
    assert len(load_dataset(str(tmp_path / "two.npz"))) == 4
    test = load_dataset(tmp_path / "two.npz", split="test")
    assert len(test) == 2 and test.targets.tolist() == [1, 0] and "test" in test.name


def test_torch_dataset_of_pil_numpy_and_tensors():
    class Mixed(torch.utils.data.Dataset):
        classes = ["even", "odd"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            items = [
                (Image.fromarray(noise((5, 5, 3))), 0),
                (noise((5, 5, 3)), torch.tensor(1)),
                (torch.from_numpy(noise((5, 5, 3))).permute(2, 0, 1).float() / 255, np.int64(0)),
            ]
            return items[i]

    ds = load_dataset(Mixed())
    assert ds.classes == ["even", "odd"] and ds.targets.tolist() == [0, 1, 0]
    assert all(torch.equal(ds[i][0], ds[0][0]) for i in range(3))
    assert load_dataset(ds) is ds


def test_torch_dataset_of_mixed_sizes_keeps_each_size():
    class Sizes(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 4 + i, 4, dtype=torch.uint8), i

    ds = load_dataset(Sizes())
    assert [tuple(ds[i][0].shape) for i in range(2)] == [(1, 4, 4), (1, 5, 4)]
    assert ds.subset([1])[0][0].shape == (1, 5, 4)


def test_digits():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    image, _ = ds[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and int(image[0, 1, 3]) == round(15 * 255 / 16)


@needs_shared
def test_real_npz_files():
    cifar = load_dataset(SHARED / "data" / "cifar10_jpeg_train8k.npz")
    assert len(cifar) == 8000 and cifar[0][0].shape == (3, 32, 32) and cifar.classes[0] == "airplane"
    mnist = load_dataset(SHARED / "data" / "mnist.npz", split="test")
    assert len(mnist) == 10000 and mnist[0][0].shape == (1, 28, 28)


# --- digests -----------------------------------------------------------------------------------


def test_array_digest_stable_and_content_sensitive():
    x, y = noise((5, 4, 4)), np.array([0, 1, 0, 1, 0])
    d = load_dataset((x, y)).digest()
    assert d == load_dataset((x.copy(), y.copy())).digest() and len(d) == 64
    x2 = x.copy()
    x2[3, 1, 1] ^= 1
    assert load_dataset((x2, y)).digest() != d
    assert load_dataset((x, 1 - y)).digest() != d
    assert load_dataset((x, y)).subset([0, 1, 2]).digest() != d


def test_folder_digest_tracks_files(tmp_path):
    root = write_folder(tmp_path / "pets")
    d = load_dataset(root).digest()
    assert load_dataset(root).digest() == d
    target = root / "cats" / "a.png"
    st = target.stat()
    Image.fromarray(noise((12, 10, 3), 9)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert load_dataset(root).digest() != d


# --- bad data ----------------------------------------------------------------------------------


def test_missing_path_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("data/missing.npz")
    with pytest.raises(DataError, match="unknown dataset source 'cifar'.*digits"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="neither a folder nor an .npz"):
        (tmp_path / "a.csv").write_text("1,2")
        load_dataset(tmp_path / "a.csv")
    with pytest.raises(DataError, match="cannot load a dataset from a list"):
        load_dataset([1, 2])


def test_truncated_jpeg_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    jpeg = root / "dogs" / "nested" / "d.jpg"
    Image.fromarray(noise((64, 64, 3))).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"d\.jpg.*(truncated|corrupt)"):
        load_dataset(root)


def test_corruption_after_loading_raises_on_getitem(tmp_path):
    root = write_folder(tmp_path / "pets")
    ds = load_dataset(root)
    jpeg = root / "dogs" / "nested" / "d.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cannot read image file .*d\.jpg"):
        ds[3]


def test_non_image_with_png_extension_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "cats" / "fake.png").write_text("hello, not a png")
    with pytest.raises(DataError, match=r"fake\.png"):
        load_dataset(root)


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "birds").mkdir()
    (root / "birds" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*birds has no images"):
        load_dataset(root)


def test_single_class_is_rejected(tmp_path):
    (tmp_path / "only").mkdir()
    Image.fromarray(noise((4, 4, 3))).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match=r"1 class sub-folder.*at least two"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match=r"1 class.*at least two"):
        load_dataset((noise((3, 4, 4)), [0, 0, 0]))


def test_length_mismatch_gives_both_lengths():
    with pytest.raises(DataError, match=r"5 images but y has 4 labels"):
        load_dataset((noise((5, 4, 4)), [0, 1, 0, 1]))


def test_labels_out_of_range_or_negative():
    with pytest.raises(DataError, match=r"label 3 is out of range.*0\.\.2"):
        load_dataset((noise((4, 4, 4)), [0, 1, 2, 3]), classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"label -1 is out of range"):
        load_dataset((noise((4, 4, 4)), [0, 1, -1, 1]))


@pytest.mark.parametrize(
    "y",
    [
        np.array([0, 1, 10**12, 1]),
        np.array([0, 1, 2**63 + 5, 1], dtype=np.uint64),  # would wrap to a negative int64
        np.array([0.0, 1.0, 1e30, 1.0]),
        np.array([0.0, 1.0, np.inf, 1.0]),
        np.array([0, 1, -(10**12), 1]),
    ],
    ids=["1e12", "uint64-over-int64", "float-1e30", "inf", "-1e12"],
)
def test_huge_labels_in_an_npz_are_refused_before_any_allocation(tmp_path, y, monkeypatch):
    """Issue #17: a label of 10^12 used to build a class list of 10^12 names (MemoryError)."""
    import fusion_engine.core.data as data

    path = tmp_path / "huge.npz"
    np.savez(path, x=noise((4, 5, 5)), y=y)
    monkeypatch.setattr(data, "_as_uint8", lambda *a: pytest.fail("images converted before the labels were checked"))
    bad = str(int(y[2])) if y.dtype.kind in "iu" else str(y[2])  # 1000000000000, 1e+30, inf
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: label {re.escape(bad)} is out of range.*100,000"):
        load_dataset(path)


def test_labels_above_the_class_cap_are_refused_everywhere(tmp_path):
    with pytest.raises(DataError, match=r"label 100000 is out of range"):
        load_dataset((noise((2, 4, 4)), [0, MAX_CLASSES]), classes=[str(i) for i in range(3)])
    with pytest.raises(DataError, match=r"100001 class names; at most 100,000"):
        load_dataset((noise((2, 4, 4)), [0, 1]), classes=[str(i) for i in range(MAX_CLASSES + 1)])
    np.savez(tmp_path / "names.npz", x=noise((2, 4, 4)), y=[0, 1], classes=np.array("ab"))
    with pytest.raises(DataError, match=r"names\.npz: 'classes' has shape \(\); expected one name per class"):
        load_dataset(tmp_path / "names.npz")

    class Huge(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return noise((4, 4)), [0, 10**30][i]

    with pytest.raises(DataError, match=r"item 1 of Huge: label 10{30} is out of range"):
        load_dataset(Huge())


def test_without_class_names_labels_cannot_make_more_classes_than_images(tmp_path):
    np.savez(tmp_path / "sparse.npz", x_train=noise((4, 5, 5)), y_train=[0, 1, 9, 1])
    with pytest.raises(
        DataError,
        match=r"sparse\.npz \(x_train, y_train\): label 9 would make 10 classes for 4 images.*name the classes",
    ):
        load_dataset(tmp_path / "sparse.npz")
    named = load_dataset((noise((4, 5, 5)), [0, 1, 9, 1]), classes=[str(i) for i in range(10)])  # named: allowed
    assert len(named.classes) == 10 and named.targets.tolist() == [0, 1, 9, 1]
    assert load_dataset((noise((4, 5, 5)), [0, 1, 3, 1])).classes == ["0", "1", "2", "3"]  # K = n: allowed


@pytest.mark.parametrize(
    "x, match",
    [
        (noise((4, 4)), "shape"),
        (noise((4, 5, 5, 2)), "shape"),
        (np.full((4, 3, 3), "a"), "dtype"),
        (np.full((4, 3, 4), 2.0), r"\[0, 1\]"),
        (np.full((4, 3, 4), 300), "0..255"),
    ],
)
def test_bad_image_arrays(x, match):
    with pytest.raises(DataError, match=match):
        load_dataset((x, [0, 1, 0, 1]))


def test_bad_npz_contents(tmp_path):
    np.savez(tmp_path / "odd.npz", images=noise((2, 3, 3)))
    with pytest.raises(DataError, match=r"odd\.npz has arrays \['images'\]"):
        load_dataset(tmp_path / "odd.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"junk\.npz"):
        load_dataset(tmp_path / "junk.npz")


# --- split, collate, float conversion ----------------------------------------------------------


def test_stratified_split_keeps_proportions_and_is_seeded():
    y = np.repeat([0, 1, 2], [60, 30, 10])
    ds = load_dataset((noise((100, 4, 4)), y))
    train, held = stratified_split(ds, 0.2, seed=1)
    assert len(train) == 80 and len(held) == 20
    assert np.bincount(held.targets).tolist() == [12, 6, 2]
    assert train.classes == ds.classes
    again, _ = stratified_split(ds, 0.2, seed=1)
    other, _ = stratified_split(ds, 0.2, seed=2)
    assert again.digest() == train.digest() and other.digest() != train.digest()
    assert len(stratified_split(ds, 30, seed=0)[1]) == 30


def test_stratified_split_rejects_lone_class():
    ds = load_dataset((noise((5, 4, 4)), [0, 0, 1, 1, 2]), classes=["a", "b", "c"])
    with pytest.raises(DataError, match="'c'.*only one image"):
        stratified_split(ds, 0.4, seed=0)


def test_collate_same_size_mixed_size_and_channels():
    batch = [(torch.full((3, 4, 4), 255, dtype=torch.uint8), 0), (torch.zeros(3, 4, 4, dtype=torch.uint8), 1)]
    images, labels = collate_images(batch)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 4, 4) and images.max() == 1
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1]

    mixed = [(torch.full((1, 6, 6), 51, dtype=torch.uint8), 1), (torch.full((3, 8, 10), 255, dtype=torch.uint8), 0)]
    with pytest.raises(DataError, match=r"differ in size.*size="):
        collate_images(mixed)
    images, labels = collate_images(mixed, size=(5, 7))
    assert images.shape == (2, 3, 5, 7) and labels.tolist() == [1, 0]
    assert torch.allclose(images[0], torch.full((3, 5, 7), 0.2))  # grey repeated to RGB
    assert torch.allclose(images[1], torch.ones(3, 5, 7))


def test_collate_in_a_dataloader(tmp_path):
    ds = load_dataset(write_folder(tmp_path / "pets"))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=functools.partial(collate_images, size=16))
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == ds.targets.tolist()


def test_to_float_images_layouts():
    hwc = noise((2, 5, 6, 3))
    expected = torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(to_float_images(hwc), expected)
    assert torch.equal(to_float_images(torch.from_numpy(hwc).permute(0, 3, 1, 2)), expected)
    assert torch.equal(to_float_images(hwc / 255.0), expected.double().float())
    assert to_float_images(noise((2, 5, 6))).shape == (2, 1, 5, 6)
    assert to_float_images(torch.rand(2, 1, 3, 3)).shape == (2, 1, 3, 3)
    for bad in [noise((5, 6, 3)), noise((2, 5, 6, 4)), noise((5,))]:
        with pytest.raises(DataError):
            to_float_images(bad)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        to_float_images(np.full((1, 3, 4), -0.5))


# --- the sample photos shipped with the package -----------------------------------------------------------


def test_shipped_sample_photos_load_with_their_documented_classes_and_counts():
    train, test = load_dataset("cifar10-sample"), load_dataset("cifar10-sample", split="test")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert train.classes == classes and test.classes == classes
    assert np.bincount(train.targets).tolist() == [200] * 10 and np.bincount(test.targets).tolist() == [100] * 10
    assert tuple(train[0][0].shape) == (3, 32, 32)
    readme = (SAMPLES["cifar10-sample"].parent / "README.md").read_text()
    digest = hashlib.sha256(SAMPLES["cifar10-sample"].read_bytes()).hexdigest()
    assert f"`{digest}`" in readme and "Krizhevsky" in readme


def test_the_shipped_test_part_can_be_named_as_the_cli_takes_it():
    by_name, by_split = load_dataset("cifar10-sample:test"), load_dataset("cifar10-sample", split="test")
    assert len(by_name) == 1000 and by_name.digest() == by_split.digest()
    assert by_name.digest() != load_dataset("cifar10-sample:train").digest()
    with pytest.raises(DataError, match="x_validation"):
        load_dataset("cifar10-sample:validation")


def test_shipped_sample_train_and_test_parts_share_no_image():
    with np.load(SAMPLES["cifar10-sample"], allow_pickle=False) as d:
        train = {hashlib.sha256(x.tobytes()).hexdigest() for x in d["x_train"]}
        test = {hashlib.sha256(x.tobytes()).hexdigest() for x in d["x_test"]}
        assert not set(d["source_index_train"].tolist()) & set(d["source_index_test"].tolist())
    assert len(test) == 1000 and not train & test


def test_the_cli_holds_out_the_test_part_a_source_carries(tmp_path):
    import argparse

    from fusion_engine.cli.common import load_train_test

    def parts(data, **options):
        args = argparse.Namespace(data=data, data_test=None, test_fraction=0.25, seed=0, **options)
        _, train, test = load_train_test(args, log=lambda *a: None)
        return train, test

    train, test = parts("cifar10-sample")  # the default of fusion-engine train
    assert (len(train), len(test)) == (2000, 1000)
    assert test.digest() == load_dataset("cifar10-sample:test").digest()
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    y = np.arange(40) % 2
    np.savez(tmp_path / "split.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    np.savez(tmp_path / "one.npz", x=x, y=y)
    assert [len(p) for p in parts(str(tmp_path / "split.npz"))] == [30, 10]
    assert [len(p) for p in parts(str(tmp_path / "one.npz"))] == [30, 10]  # no test part: a stratified split
    assert own_test_source("digits") is None and own_test_source(str(tmp_path / "missing.npz")) is None


def test_an_unknown_dataset_name_suggests_the_shipped_ones():
    with pytest.raises(DataError, match=r"unknown dataset source 'cifar10-sampel' \(did you mean 'cifar10-sample'\?\)"):
        load_dataset("cifar10-sampel")
