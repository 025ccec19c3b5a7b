"""File safety for artifacts: names confined to their folder, integrity checks, weights read without running code."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from fusion_engine.errors import ArtifactError, WeightsError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def create_private_file(path, data: bytes) -> Path:
    """Create ``path`` with mode 0600 from the start; refuse to replace an existing file or link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ArtifactError(f"{path} already exists; choose another path or delete it first") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def member_path(folder, name) -> Path:
    """Path of the manifest-listed file ``name`` inside ``folder``.

    ``name`` must be a plain relative path with ``/`` separators; no part of it inside the folder may be a symlink.
    """
    if not isinstance(name, str) or any(part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"file name {name!r} in the manifest is not a plain relative path inside the artifact")
    if "\\" in name or ":" in name:
        raise ArtifactError(f"file name {name!r} in the manifest has a backslash or drive; only '/' paths are allowed")
    root = Path(folder).resolve()
    path = root
    for part in name.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # does not exist: nothing below it can be a link
        except (OSError, ValueError) as e:  # NUL byte, unencodable or over-long name
            raise ArtifactError(f"file name {name!r} in the manifest cannot be used: {e}") from None
        if stat.S_ISLNK(mode):
            raise ArtifactError(f"{name!r} in the artifact is a symbolic link; links are refused")
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(f"file name {name!r} in the manifest points outside the artifact folder")
    return path


def _present_files(folder: Path, prefix: str = ""):
    """Every non-folder entry below ``folder`` (links included, never followed), as '/'-joined names."""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from _present_files(Path(entry.path), name + "/")
            else:
                yield name


def check_folder(folder, expected: dict[str, str], allowed_extra: tuple[str, ...] = ()) -> None:
    """Check that ``folder`` holds exactly the files in ``expected`` (name -> sha256), unmodified, besides
    the unhashed files named in ``allowed_extra``."""
    folder = Path(folder)
    for name, digest in sorted(expected.items()):
        path = member_path(folder, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"listed file {name!r} is missing from {folder}") from None
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"listed file {name!r} in {folder} is not a regular file")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{name!r} was modified: sha256 differs from the one recorded in the manifest")
    for name in sorted(_present_files(folder)):
        if name not in expected and name not in allowed_extra:
            raise ArtifactError(
                f"unexpected file {name!r} in {folder}: it is not listed in the manifest, and unlisted files are "
                "refused because code could be smuggled in through them; remove it or re-save the artifact"
            )


def load_torch_weights(path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Read a torch checkpoint (``path``, or ``data`` read from it) with the weights-only unpickler: tensors
    and plain containers, never code."""
    try:
        obj = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # raised by the weights-only unpickler before anything runs
        # torch names the GLOBAL (callable) a payload imports; other failures are garbage, not code
        what = "it holds code, not only tensors" if "GLOBAL" in str(e) else "it is not a plain tensor checkpoint"
        raise WeightsError(f"refusing to unpickle {path}: {what}; convert it to safetensors") from None
    except Exception as e:  # torch reports corrupt files as RuntimeError, KeyError, EOFError, ...
        raise WeightsError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model"):  # the usual training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise WeightsError(f"{path} is not a state dict: expected a mapping of names to tensors")
    return obj


def parse_safetensors(data: bytes, path) -> dict[str, torch.Tensor]:
    """Tensors (on the CPU) from the bytes of a safetensors file read from ``path``; malformed bytes are a
    WeightsError naming ``path``. Every safetensors reader of the package parses through here."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OverflowError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file: {e}") from None


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file on the CPU; a missing, truncated or malformed file is a WeightsError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise WeightsError(f"{path} is not a valid safetensors file: {e}") from None
    return parse_safetensors(data, path)


def load_weights_file(path, *, sha256: str | None = None, recorded_in: str = "") -> dict[str, torch.Tensor]:
    """Read a weights file, choosing the reader by its extension. With ``sha256`` (an index records it), the
    file is read once and its bytes must have that digest before they are parsed; a mismatch is a
    WeightsError naming the file and ``recorded_in`` (where the digest comes from, and the fix)."""
    suffix = Path(path).suffix.lower()
    data = None
    if sha256 is not None and suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise WeightsError(f"weights file {path} cannot be read: {e}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.strip().lower():
            raise WeightsError(
                f"weights file {path} is corrupted or was replaced: its sha256 {actual} differs from "
                f"{sha256} recorded in {recorded_in or 'its index'}"
            )
    if suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors(path) if data is None else parse_safetensors(data, path)
    if suffix in TORCH_SUFFIXES:
        return load_torch_weights(path, data)
    supported = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise WeightsError(f"{path}: unsupported weights format {suffix or '(no extension)'!r}; supported: {supported}")


def check_finite(tensors: dict[str, torch.Tensor], where) -> None:
    """Raise WeightsError naming the first floating-point tensor that holds NaN or Inf."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            raise WeightsError(f"{where}: tensor {name!r} contains NaN or Inf values")


def state_mismatch(expected: dict, given: dict, *, dtypes: bool = True) -> str:
    """'' when ``given`` tensors fit ``expected`` (a state dict) by name, shape (and dtype); else a
    short description of what is missing, unexpected or of another shape."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k}: {tuple(given[k].shape)} {given[k].dtype} (expected {tuple(v.shape)} {v.dtype})"
        for k, v in expected.items()
        if k in given and (given[k].shape != v.shape or (dtypes and given[k].dtype != v.dtype))
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape or dtype (e.g. {'; '.join(wrong[:2])})")
    return "; ".join(parts)


def read_small_file(path, limit: int) -> bytes:
    """The bytes of ``path``, read at most ``limit`` + 1 at a time: a larger file (a sidecar or a
    signature grown by tampering) is a ValueError instead of being read whole."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return raw
