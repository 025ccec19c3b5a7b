"""The feature cache checks every entry it reads (issue #17 item 4): a damaged or mismatched entry
(truncated, wrong shape or dtype, NaN written in, a pickled object array, overwritten with zeros,
a sidecar of another key, an entry without a sidecar) is discarded with a one-line note and
extracted again, and the features then equal a fresh extraction; a non-finite feature coming out
of extraction is a DataError naming the branch, and nothing is cached."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits_dataset

from fusion_engine import DataError, Engine
from fusion_engine.training.baselines import handcrafted_for
from fusion_engine.training.feature_cache import FeatureCache, FeatureCacheWarning, scan

RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32}
EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32}


@pytest.fixture(scope="module")
def data():
    return four_digits_dataset(40)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Engine.from_plugins().build({"backbones": [RESNET, EFFNET], "fusion": "concat"}, class_names=CLASSES)


@pytest.fixture(scope="module")
def fresh(model, data):
    return FeatureCache(enabled=False).features(model, data, progress=False)


@pytest.fixture(scope="module")
def pristine(model, data, tmp_path_factory):
    """A cache folder filled once; each test works on a copy."""
    folder = tmp_path_factory.mktemp("pristine")
    FeatureCache(folder).features(model, data, progress=False)
    return folder


@pytest.fixture
def cache_dir(pristine, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(pristine, folder)
    return folder


def entries(folder) -> list:
    """The keys of the entries in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob("*.npy"))


def read_with_notes(model, data, folder):
    notes = []
    cache = FeatureCache(folder, note=notes.append)
    arrays = cache.features(model, data, progress=False)
    return cache, arrays, notes


def rewrite_sidecar(folder, key, array):
    """Make the sidecar agree with a replaced array (as a careless tool or a stale copy would)."""
    meta = json.loads((folder / f"{key}.json").read_text())
    meta.update(shape=list(array.shape), dtype=str(array.dtype), sha256=scan(np.ascontiguousarray(array))[0])
    (folder / f"{key}.json").write_text(json.dumps(meta))


class Payload:
    """Unpickling this would write a file: the cache must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def damage_truncated(folder, key, tmp_path):
    path = folder / f"{key}.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_wrong_shape(folder, key, tmp_path):
    good = np.load(folder / f"{key}.npy")
    bad = np.zeros((good.shape[0], good.shape[1] + 3), np.float32)
    np.save(folder / f"{key}.npy", bad)
    rewrite_sidecar(folder, key, bad)  # even a consistent sidecar does not make it the expected shape


def damage_wrong_dtype(folder, key, tmp_path):
    good = np.load(folder / f"{key}.npy").astype(np.float64)
    np.save(folder / f"{key}.npy", good)


def damage_nan_in_file(folder, key, tmp_path):
    path = folder / f"{key}.npy"
    with open(path, "r+b") as f:
        f.seek(-4 * 7, 2)
        f.write(np.array([np.nan], np.float32).tobytes())


def damage_nan_with_matching_digest(folder, key, tmp_path):
    array = np.load(folder / f"{key}.npy").copy()
    array[3, 1] = np.inf
    np.save(folder / f"{key}.npy", array)
    rewrite_sidecar(folder, key, array)


def damage_pickled(folder, key, tmp_path):
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(str(tmp_path / "unpickled"))
    np.save(folder / f"{key}.npy", payload, allow_pickle=True)


def damage_zeros(folder, key, tmp_path):
    path = folder / f"{key}.npy"
    array = np.load(path, mmap_mode="r+")
    array[:] = 0.0  # same file, same shape and header: only the digest can tell
    array.flush()


def damage_other_key(folder, key, tmp_path):
    other = next(k for k in entries(folder) if k != key)
    shutil.copyfile(folder / f"{other}.npy", folder / f"{key}.npy")
    shutil.copyfile(folder / f"{other}.json", folder / f"{key}.json")


def damage_other_keys_sidecar_only(folder, key, tmp_path):
    meta = json.loads((folder / f"{key}.json").read_text())
    meta["key"] = "0" * 32
    (folder / f"{key}.json").write_text(json.dumps(meta))


def damage_npz(folder, key, tmp_path):
    array = np.load(folder / f"{key}.npy")
    with open(folder / f"{key}.npy", "wb") as f:
        np.savez(f, x=array)


def damage_sidecar_key_with_escapes(folder, key, tmp_path):
    meta = json.loads((folder / f"{key}.json").read_text())
    meta.update(key="\x1b[2J\x1b[31mEVIL", shape="\x1b[0m")
    (folder / f"{key}.json").write_text(json.dumps(meta))


def damage_no_sidecar(folder, key, tmp_path):  # an entry written by an older version
    (folder / f"{key}.json").unlink()


def damage_sidecar_garbage(folder, key, tmp_path):
    (folder / f"{key}.json").write_bytes(b"\x00\xffnot json")


def damage_npy_missing(folder, key, tmp_path):
    (folder / f"{key}.npy").unlink()


CASES = {
    "truncated": (damage_truncated, "unreadable .npy"),
    "wrong shape": (damage_wrong_shape, "expected float32"),
    "wrong dtype": (damage_wrong_dtype, "expected float32"),
    "NaN written into the file": (damage_nan_in_file, "do not match the sha256"),
    "inf with a recomputed digest": (damage_nan_with_matching_digest, "non-finite values"),
    "pickled object array": (damage_pickled, "unreadable .npy"),
    "overwritten with zeros": (damage_zeros, "do not match the sha256"),
    "entry copied from another key": (damage_other_key, "written for key"),
    "sidecar names another key": (damage_other_keys_sidecar_only, "written for key"),
    "an .npz archive": (damage_npz, "not an array"),
    "sidecar with terminal escapes": (damage_sidecar_key_with_escapes, "written for key '\\x1b[2J"),
    "no sidecar (older version)": (damage_no_sidecar, "no sidecar"),
    "sidecar not JSON": (damage_sidecar_garbage, "unreadable sidecar"),
    "features file missing": (damage_npy_missing, "features file is missing"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_damaged_entry_is_discarded_noted_once_and_extracted_again(case, model, data, fresh, cache_dir, tmp_path):
    damage, reason = CASES[case]
    key = entries(cache_dir)[0]
    damage(cache_dir, key, tmp_path)

    cache, arrays, notes = read_with_notes(model, data, cache_dir)
    assert len(notes) == 1 and "\n" not in notes[0] and "\x1b" not in notes[0], notes
    assert f"{key}.npy" in notes[0] and reason in notes[0], notes[0]
    ((path, why),) = cache.discarded
    assert path.name == f"{key}.npy" and reason in why
    assert cache.stats["hits"] == 1 and cache.stats["extracted"] == 1  # only the damaged entry
    for a, f in zip(arrays, fresh):
        np.testing.assert_array_equal(np.asarray(a), f)
    assert not (tmp_path / "unpickled").exists(), "the pickled payload was unpickled"

    # the entry was rewritten whole: the next read is a clean hit
    again, arrays, notes = read_with_notes(model, data, cache_dir)
    assert notes == [] and again.stats["hits"] == 2 and again.stats["extracted"] == 0
    for a, f in zip(arrays, fresh):
        np.testing.assert_array_equal(np.asarray(a), f)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_the_default_note_is_a_warning_naming_the_file(model, data, fresh, cache_dir, tmp_path):
    key = entries(cache_dir)[0]
    damage_zeros(cache_dir, key, tmp_path)
    with pytest.warns(FeatureCacheWarning, match=rf"discarded .*{key}\.npy: its bytes do not match") as record:
        arrays = FeatureCache(cache_dir).features(model, data, progress=False)
    assert len([w for w in record if issubclass(w.category, FeatureCacheWarning)]) == 1
    np.testing.assert_array_equal(np.asarray(arrays[0]), fresh[0])
    np.testing.assert_array_equal(np.asarray(arrays[1]), fresh[1])


def test_every_entry_has_a_sidecar_recording_what_it_must_be(pristine, fresh):
    for key in entries(pristine):
        meta = json.loads((pristine / f"{key}.json").read_text())
        array = np.load(pristine / f"{key}.npy", allow_pickle=False)
        assert meta["key"] == key and meta["dtype"] == "float32" and meta["shape"] == list(array.shape)
        assert meta["sha256"] == scan(array)[0]
        assert any(a.shape == array.shape and np.array_equal(a, array) for a in fresh)


def test_a_non_finite_feature_from_extraction_is_a_data_error_naming_the_branch(model, data, tmp_path, monkeypatch):
    branch = model.branches[1]
    original = branch.extract

    def with_nan(output):
        features = original(output).clone()
        features[-1, 2] = float("nan")
        return features

    monkeypatch.setattr(branch, "extract", with_nan)
    with pytest.raises(DataError, match=rf"branch 1 \({branch.name}\) produced a non-finite feature") as info:
        FeatureCache(tmp_path).features(model, data, progress=False)
    assert "nothing was cached" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither branch's entry, nor a temporary file
    with pytest.raises(DataError, match=r"branch 1 .* non-finite"):  # without a cache too
        FeatureCache(enabled=False).features(model, data, progress=False)


def test_handcrafted_entries_are_checked_too(data, tmp_path):
    notes = []
    first = np.array(handcrafted_for(data, FeatureCache(tmp_path, note=notes.append)))
    (key,) = entries(tmp_path)
    damage_zeros(tmp_path, key, tmp_path)
    cache = FeatureCache(tmp_path, note=notes.append)
    again = handcrafted_for(data, cache)
    assert len(notes) == 1 and "do not match the sha256" in notes[0]
    assert cache.stats == {"hits": 0, "extracted": 1, "extract_seconds": cache.stats["extract_seconds"]}
    np.testing.assert_array_equal(np.asarray(again), first)


@pytest.fixture
def one_rank_world(monkeypatch):
    """The distributed (sharded) extraction path, in one process: a world of one rank."""
    import fusion_engine.training.distributed as distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "all_sum", lambda values: list(values))


def test_sharded_extraction_checks_entries_too(one_rank_world, model, data, fresh, cache_dir, tmp_path, monkeypatch):
    key = entries(cache_dir)[1]
    damage_zeros(cache_dir, key, tmp_path)
    cache, arrays, notes = read_with_notes(model, data, cache_dir)
    assert len(notes) == 1 and f"{key}.npy" in notes[0] and "do not match the sha256" in notes[0]
    assert cache.stats["hits"] == 1 and cache.stats["extracted"] == 1
    for a, f in zip(arrays, fresh):
        np.testing.assert_array_equal(np.asarray(a), f)
    assert read_with_notes(model, data, cache_dir)[2] == []  # rewritten with its sidecar by the join

    branch = model.branches[0]
    original = branch.extract
    monkeypatch.setattr(branch, "extract", lambda output: original(output) * float("inf"))
    with pytest.raises(DataError, match=rf"branch 0 \({branch.name}\) produced a non-finite feature"):
        FeatureCache(tmp_path / "fresh").features(model, data, progress=False)
    assert list((tmp_path / "fresh").iterdir()) == []  # no shard, no entry
