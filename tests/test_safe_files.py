"""File safety: confined member names, folder integrity, weights loading that never runs code."""

import contextlib
import pathlib
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fusion_engine.artifacts.manifest import UNLISTED_FILES
from fusion_engine.artifacts.safe_files import (
    check_finite,
    check_folder,
    load_safetensors,
    load_torch_weights,
    load_weights_file,
    member_path,
    sha256_file,
)
from fusion_engine.errors import ArtifactError, WeightsError


class TouchPayload:
    """Unpickling this creates ``marker``: stands in for any code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_payload(path, marker, fmt):
    obj = {"weight": torch.ones(2), "evil": TouchPayload(marker)}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle renamed .bin
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("loader", [load_torch_weights, load_weights_file])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, fmt, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    write_payload(path, marker, fmt)
    with pytest.raises(WeightsError, match="refusing to unpickle .*evil.bin: it holds code, not only tensors; convert"):
        loader(path)
    assert not marker.exists()
    # the payload is live: an unsafe load does run it (a bare pickle then fails torch's magic-number check)
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_plain_state_dict_loads(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save({"a": torch.arange(3.0), "b.c": torch.zeros(2, 2)}, path)
    loaded = load_weights_file(path)
    assert set(loaded) == {"a", "b.c"} and torch.equal(loaded["a"], torch.arange(3.0))


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(1)}}, path)
    assert list(load_torch_weights(path)) == ["w"]


def test_non_tensor_checkpoint_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": [1, 2]}, path)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_torch_weights(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a checkpoint at all", "refusing to unpickle .*broken.pt: it is not a plain tensor checkpoint"),
        (b"hello world", "broken.pt is not a readable torch checkpoint"),
        (b"PK\x03\x04truncated zip", "broken.pt is not a readable torch checkpoint"),
    ],
)
def test_corrupt_torch_file_names_it(tmp_path, data, message):
    path = tmp_path / "broken.pt"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=message):
        load_torch_weights(path)


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64), "b": torch.zeros(3, 3)}, path)
    return path


def test_safetensors_loads(safetensors_file):
    assert torch.equal(load_weights_file(safetensors_file)["a"], torch.ones(64))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[: len(b) - 10],  # truncated data
        lambda b: b[:20],  # truncated header
        lambda b: b[:8] + b"{garbage" + b[16:],  # header garbage
        lambda b: (1 << 40).to_bytes(8, "little") + b[8:],  # header length mismatch
        lambda b: b"",
    ],
)
def test_malformed_safetensors_names_the_file(safetensors_file, corrupt):
    safetensors_file.write_bytes(corrupt(safetensors_file.read_bytes()))
    with pytest.raises(WeightsError, match="w.safetensors is not a valid safetensors file"):
        load_safetensors(safetensors_file)


def test_unknown_extension_lists_supported_formats(tmp_path):
    with pytest.raises(WeightsError, match=r"unsupported weights format '\.npz'.*\.safetensors.*\.pt"):
        load_weights_file(tmp_path / "w.npz")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_tensor(bad):
    tensors = {"ok": torch.ones(3), "ints": torch.arange(3), "head.weight": torch.tensor([1.0, bad])}
    with pytest.raises(WeightsError, match="backbone.safetensors: tensor 'head.weight' contains NaN or Inf"):
        check_finite(tensors, "backbone.safetensors")
    check_finite({"ok": torch.ones(3)}, "fine")


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# --- member names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/../../b", "", ".", "a//b", "a/", "..\\x", "C:/x", "c:x", "a\\b"]
)
def test_member_path_rejects_escapes(tmp_path, name):
    with pytest.raises(ArtifactError, match="manifest"):
        member_path(tmp_path, name)


def test_member_path_rejects_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    art = tmp_path / "art"
    art.mkdir()
    (art / "link").symlink_to(outside / "secret")
    (art / "dirlink").symlink_to(outside)
    for name in ("link", "dirlink/secret"):
        with pytest.raises(ArtifactError, match="symbolic link"):
            member_path(art, name)


def test_member_path_accepts_nested_names(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"x")
    assert member_path(tmp_path, "sub/w.safetensors") == tmp_path.resolve() / "sub" / "w.safetensors"


@pytest.fixture(scope="module")
def member_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    (root / "art" / "sub").mkdir(parents=True)
    (root / "art" / "model.safetensors").write_bytes(b"x")
    (root / "art" / "link").symlink_to(root)
    return root / "art"


NAME_PARTS = st.sampled_from(["..", ".", "", "a", "sub", "link", "model.safetensors", "\\", "C:", "\x00", "~"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(), st.lists(NAME_PARTS, max_size=6).map("/".join), st.text(alphabet="./\\:a\x00")))
def test_random_member_names_stay_inside_or_raise(member_folder, name):
    try:
        path = member_path(member_folder, name)
    except ArtifactError:
        return
    assert path.resolve().is_relative_to(member_folder.resolve())


# --- folder integrity ---------------------------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path):
    folder = tmp_path / "art"
    (folder / "heads").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "heads" / "extra.safetensors").write_bytes(b"head")
    (folder / "manifest.json").write_text("{}")
    expected = {name: sha256_file(folder / name) for name in ("model.safetensors", "heads/extra.safetensors")}
    return folder, expected


def test_check_folder_accepts_intact_artifact(artifact):
    folder, expected = artifact
    check_folder(folder, expected, UNLISTED_FILES)
    (folder / "manifest.sig").write_text("{}")
    check_folder(folder, expected, UNLISTED_FILES)


def test_check_folder_allows_only_the_named_unlisted_files(artifact):
    folder, expected = artifact
    with pytest.raises(ArtifactError, match="unexpected file 'manifest.json'"):
        check_folder(folder, expected)  # no allowed_extra: every file must be listed


def test_check_folder_modified_byte(artifact):
    folder, expected = artifact
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[10] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="'model.safetensors' was modified: sha256 differs"):
        check_folder(folder, expected, UNLISTED_FILES)


def test_check_folder_missing_file(artifact):
    folder, expected = artifact
    (folder / "heads" / "extra.safetensors").unlink()
    with pytest.raises(ArtifactError, match="listed file 'heads/extra.safetensors' is missing"):
        check_folder(folder, expected, UNLISTED_FILES)


@pytest.mark.parametrize("name", ["evil.py", "heads/__init__.py", "sub/manifest.json"])
def test_check_folder_unlisted_file(artifact, name):
    folder, expected = artifact
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_text("import os")
    with pytest.raises(ArtifactError, match=f"unexpected file '{name}'.*not listed.*code could be smuggled"):
        check_folder(folder, expected, UNLISTED_FILES)


def test_check_folder_unlisted_symlink(artifact, tmp_path):
    folder, expected = artifact
    (folder / "plugins").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="unexpected file 'plugins'"):
        check_folder(folder, expected, UNLISTED_FILES)


def test_check_folder_symlinked_listed_file(artifact, tmp_path):
    folder, expected = artifact
    real = tmp_path / "real.safetensors"
    real.write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(real)
    with pytest.raises(ArtifactError, match="'model.safetensors' in the artifact is a symbolic link"):
        check_folder(folder, expected, UNLISTED_FILES)


def test_check_folder_listed_directory(artifact):
    folder, expected = artifact
    with pytest.raises(ArtifactError, match="'heads' .* is not a regular file"):
        check_folder(folder, {**expected, "heads": "0" * 64}, UNLISTED_FILES)


def test_check_folder_rejects_escaping_listed_name(artifact):
    folder, expected = artifact
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        check_folder(folder, {**expected, "../outside": "0" * 64}, UNLISTED_FILES)
