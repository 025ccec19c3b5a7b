"""ONNX export of a whole fused model, checked against torch on real images, and prediction with onnxruntime.

The exported graph is the whole FusedClassifier: each branch's resize and normalisation, every
backbone, extractor and the fusion. Its input contract (stored in the ONNX metadata as
``fusion_engine.input``):

- ``images``: float32 (batch, C, H, W) in [0, 1], RGB (C=3) or grey (C=1) as the model's branches
  want, at the fixed size H x W chosen at export (default: the largest branch input size, so that
  branch needs no resize); the batch size is dynamic. Branches with a smaller input size resize
  inside the graph (bilinear, antialiased: ONNX Resize with antialias, opset 18).
- outputs ``logits`` and ``probabilities`` (softmax), (batch, num_classes); class names are in
  ``fusion_engine.class_names``.

Resize the images to H x W before feeding them (``predict_onnx_files`` does, as ``predict`` does).
Export writes to a temporary file, compares the ONNX model's probabilities with torch's on real
images (max abs diff <= 1e-4 by default) and only then moves it into place; otherwise it raises
ExportError and leaves nothing behind. ``onnx``, ``onnxruntime`` and ``onnxscript`` are
dependencies of fusion-engine (onnxruntime is the default extraction runtime on the CPU).

Signed files: ``export_onnx(..., signing_key=PRIVATE)`` (``fusion-engine export --sign-key``) writes
``FILE.onnx.sig`` beside the file: an Ed25519 signature (the key format of ``artifacts/signing.py``)
over a small JSON naming the file's sha256 and size. ``verify_onnx(FILE, PUBLIC)`` reads the .onnx
bytes once, checks the signature, then those bytes' digest, and returns exactly those bytes, which
``onnx_session`` hands to onnxruntime (nothing is read from the path twice).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from fusion_engine.artifacts.atomic import atomic_write_text
from fusion_engine.artifacts.compression import steps
from fusion_engine.artifacts.safe_files import read_small_file
from fusion_engine.artifacts.signing import _load_key, fingerprint
from fusion_engine.errors import ArtifactError, ExportError
from fusion_engine.version import __version__

OPSET = 18
TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.95  # an int8 graph's top-1 must agree with torch's on at least this share of the check images
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
META_PREFIX = "fusion_engine."
SIGNATURE_SUFFIX = ".sig"  # FILE.onnx -> FILE.onnx.sig
SIGNED_FORMAT = "fusion-engine-onnx-v1"
ONNX_DOMAIN = b"fusion-engine-onnx-v1\n"  # a manifest signature (another domain) never verifies here
MAX_SIGNATURE_BYTES = 64 * 1024


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX support needs {', '.join(missing)}: pip install onnx onnxruntime onnxscript "
            "(dependencies of fusion-engine; reinstall it)"
        )


class _WithProbabilities(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        logits = self.model(images)
        return logits, torch.softmax(logits, dim=1)


def input_contract(model, input_size=None) -> dict:
    """The exported graph's input: channels, fixed height and width, value range, layout."""
    from fusion_engine.core.network import input_size_for

    if input_size is None:
        height, width = input_size_for(model)
    elif isinstance(input_size, int):
        height = width = input_size
    else:
        height, width = (int(v) for v in input_size)
    channels = max(int(b.backbone.data_config["input_size"][0]) for b in model.branches)
    return {
        "name": INPUT_NAME,
        "shape": ["batch", channels, height, width],
        "dtype": "float32",
        "range": [0.0, 1.0],
        "layout": "NCHW",
        "channels": "RGB" if channels == 3 else "grey",
        "resize": f"resize images to {height}x{width} (bilinear, antialiased) before feeding them",
    }


def check_images(data, contract: dict, count: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` real images from ``data`` (seeded sample), as the graph's input: float (N, C, H, W) in [0, 1]."""
    from fusion_engine.core.data import collate_images, load_dataset

    dataset = load_dataset(data)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(dataset), size=min(count, len(dataset)), replace=False))
    _, channels, height, width = contract["shape"]
    images, _ = collate_images([dataset[int(i)] for i in picked], size=(height, width))
    return to_channels(images, channels)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images.contiguous()
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    return images.mean(dim=1, keepdim=True)


def onnx_session(path):
    """An onnxruntime CPU session for the ONNX file at ``path``, or for the model bytes ``path`` (as
    ``verify_onnx`` returns them); ExportError when onnxruntime is missing."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    source = bytes(path) if isinstance(path, (bytes, bytearray)) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def signature_path(path) -> Path:
    """Where the signature of the ONNX file ``path`` lives: ``FILE.onnx.sig`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def _signed_payload(data: bytes) -> bytes:
    """The JSON that is signed: the file's sha256 and size (not its name: a renamed file still verifies)."""
    payload = {"format": SIGNED_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return json.dumps(payload, sort_keys=True).encode("utf-8")


def _signature_record(data: bytes, key: Ed25519PrivateKey) -> str:
    payload = _signed_payload(data)
    record = {
        "algorithm": "ed25519",
        "public_key_fingerprint": fingerprint(key.public_key()),
        "signed": payload.decode("utf-8"),
        "signature": base64.b64encode(key.sign(ONNX_DOMAIN + payload)).decode("ascii"),
    }
    return json.dumps(record, indent=2) + "\n"


def sign_onnx(path, private_key_path) -> str:
    """Sign the ONNX file at ``path`` into ``FILE.onnx.sig``; return the key's fingerprint."""
    key = _load_key(private_key_path, "private", Ed25519PrivateKey)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    record = _signature_record(data, key)
    atomic_write_text(signature_path(path), record)
    return json.loads(record)["public_key_fingerprint"]


def _unsigned_message(path, sig: Path) -> str:
    return (
        f"{path} is not signed: {sig} is missing; export it with "
        f"`fusion-engine export RUN_DIR --out {Path(path).name} --sign-key PRIVATE_KEY` "
        "(or sign the file with fusion_engine.runtime.export.sign_onnx)"
    )


def _read_onnx_signature(path, sig: Path) -> tuple[str, str, bytes]:
    """(fingerprint, signed payload, signature) from ``FILE.onnx.sig``, or an ArtifactError."""
    try:
        record = json.loads(read_small_file(sig, MAX_SIGNATURE_BYTES))
        fields = [record["public_key_fingerprint"], record["signed"], record["signature"]]
        if record["algorithm"] != "ed25519" or not all(isinstance(f, str) for f in fields):
            raise ValueError("unexpected algorithm or field type")
        signature = base64.b64decode(fields[2], validate=True)
    except FileNotFoundError:
        raise ArtifactError(_unsigned_message(path, sig)) from None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise ArtifactError(f"signature file {sig} is malformed: {type(e).__name__}: {e}") from None
    return fields[0], fields[1], signature


def verify_onnx(path, public_key_path) -> bytes:
    """The bytes of the ONNX file at ``path``, read once and returned only when ``FILE.onnx.sig`` is a
    valid signature by ``public_key_path``'s key over exactly these bytes' sha256; else ArtifactError."""
    key = _load_key(public_key_path, "public", Ed25519PublicKey)
    expected = fingerprint(key)
    sig = signature_path(path)
    signed_by, payload, signature = _read_onnx_signature(path, sig)
    if signed_by != expected:
        raise ArtifactError(f"{path} is signed by another key (fingerprint {signed_by}), expected {expected}")
    try:
        key.verify(signature, ONNX_DOMAIN + payload.encode("utf-8"))
    except InvalidSignature:
        raise ArtifactError(f"{sig} is invalid: not made by this key for this file") from None
    try:
        signed = json.loads(payload)
        if signed["format"] != SIGNED_FORMAT or not isinstance(signed["sha256"], str):
            raise ValueError(f"unexpected format {signed['format']!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"signature file {sig} is malformed: {type(e).__name__}: {e}") from None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if hashlib.sha256(data).hexdigest() != signed["sha256"]:
        raise ArtifactError(f"{path} changed after signing, or {sig.name} was made for another file")
    return data


def parity(model, path, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Probabilities of torch and onnxruntime on ``images``: max abs difference and top-1 agreement."""
    session = onnx_session(path)
    diffs, agree = [], 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            expected = torch.softmax(model(x).float(), dim=1).numpy()
            got = session.run(["probabilities"], {INPUT_NAME: x.numpy()})[0]
            diffs.append(float(np.abs(got - expected).max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
    return {"images": len(images), "max_abs_diff": max(diffs), "top1_agreement": agree / len(images)}


def _export_graph(module: nn.Module, path, example: torch.Tensor, output_names, opset: int = OPSET) -> None:
    """torch.onnx.export (dynamo) of ``module`` at ``example``'s fixed size, dynamic batch."""
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from None


def _example(channels: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(2, channels, height, width, generator=torch.Generator().manual_seed(0))


def write_onnx(
    model, path, contract: dict, *, opset: int = OPSET, source: dict | None = None, calibration=None
) -> None:
    """Export ``model`` to ``path`` with the ``fusion_engine.*`` metadata (no parity check); with
    ``calibration`` (data ``load_dataset`` takes) the graph is quantised to static int8, calibrated on
    a seeded sample of its images (``runtime/int8.py``)."""
    import onnx

    if any(s["method"] == "int8" for s in steps(model)):
        raise ExportError(
            "int8 models cannot be exported to ONNX (torch's dynamic int8 layers have no ONNX form); "
            "export the float model, or a static int8 graph with --int8 (export_onnx(..., int8=True))"
        )
    _export_graph(_WithProbabilities(model), path, _example(*contract["shape"][1:]), OUTPUT_NAMES, opset)
    quantization = {}
    if calibration is not None:
        from fusion_engine.runtime.int8 import CALIBRATION_IMAGES, calibration_batches, quantize_graph

        images = check_images(calibration, contract, CALIBRATION_IMAGES, seed=1)  # the check draws seed 0
        Path(path).write_bytes(quantize_graph(Path(path).read_bytes(), calibration_batches(images.numpy())))
        quantization = {"method": "int8-static", "calibration_data": str(calibration), "images": len(images)}
    proto = onnx.load(str(path))
    metadata = {
        "class_names": model.class_names,
        "input": contract,
        "outputs": {"logits": ["batch", model.num_classes], "probabilities": ["batch", model.num_classes]},
        "branches": model.branch_names,
        "compression": [s["method"] for s in steps(model)],
        "quantization": quantization,
        "fusion_engine_version": __version__,
        "torch_version": torch.__version__,
        "source": source or {},
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    proto.producer_name = "fusion-engine"
    proto.doc_string = f"fusion-engine fused classifier; input: {contract['resize']}"
    onnx.save(proto, str(path))


def export_onnx(
    model,
    out,
    *,
    input_size=None,
    check_data="digits",
    check_count: int = 64,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
    source: dict | None = None,
    signing_key=None,
    int8: bool = False,
    calibration_data=None,
) -> dict:
    """Export ``model`` to ``out`` (.onnx) and check it against torch on real images; returns the check's numbers.

    Nothing is written at ``out`` unless the check passes (max abs probability difference <= ``tolerance``;
    with ``int8``, a graph quantised on ``calibration_data``: top-1 agreement >= INT8_MIN_AGREEMENT, the
    difference reported).
    With ``signing_key`` (an Ed25519 private key file) the checked bytes are signed into ``out.sig``;
    without one, a ``out.sig`` left from an earlier export of ``out`` is removed (it names other bytes).
    """
    _require("onnx", "onnxruntime", "onnxscript")
    key = _load_key(signing_key, "private", Ed25519PrivateKey) if signing_key else None  # fails before the export
    if int8 and calibration_data is None:
        raise ExportError(
            "int8 export calibrates on real images: pass calibration data (--calibration-data DATA: a folder, an .npz "
            "or cifar10-sample; a few hundred of the training images are best)"
        )
    out = Path(out)
    model = model.eval()
    contract = input_contract(model, input_size)
    images = check_images(check_data, contract, check_count)  # before the slow export: bad data fails fast
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    start = time.perf_counter()
    try:
        write_onnx(model, tmp, contract, opset=opset, source=source, calibration=calibration_data if int8 else None)
        check = parity(model, tmp, images)
        check.update(
            tolerance=tolerance, check_data=str(check_data), export_seconds=round(time.perf_counter() - start, 1)
        )
        if int8:
            check.update(int8=True, calibration_data=str(calibration_data), min_top1_agreement=INT8_MIN_AGREEMENT)
            if check["top1_agreement"] < INT8_MIN_AGREEMENT:
                raise ExportError(
                    f"the int8 graph disagrees with torch: top-1 agreement {check['top1_agreement']:.3f} < "
                    f"{INT8_MIN_AGREEMENT} on {check['images']} images from {check_data} (max abs probability "
                    f"difference {check['max_abs_diff']:.3g}); the ONNX file was not written: export without --int8"
                )
        elif not check["max_abs_diff"] <= tolerance:
            raise ExportError(
                f"ONNX model disagrees with torch: max abs probability difference {check['max_abs_diff']:.3g} "
                f"> {tolerance:g} on {check['images']} images from {check_data} (top-1 agreement "
                f"{check['top1_agreement']:.3f}); the ONNX file was not written"
            )
        record = _signature_record(tmp.read_bytes(), key) if key else None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    signed = {}
    if record:
        atomic_write_text(signature_path(out), record)
        signed = {"signature": str(signature_path(out)), "signed_by": json.loads(record)["public_key_fingerprint"]}
    else:
        signature_path(out).unlink(missing_ok=True)
    return {"path": str(out), "input": contract, **check, **signed}


def session_for(model, input_size=None, calibration=None):
    """An onnxruntime session of ``model`` exported to a temporary file (removed once loaded); int8 with ``calibration``."""
    import tempfile

    _require("onnx", "onnxruntime", "onnxscript")
    contract = input_contract(model.eval(), input_size)
    with tempfile.TemporaryDirectory(prefix="fusion-engine-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(model, path, contract, calibration=calibration)
        return onnx_session(path)


class _BranchFeatures(nn.Module):
    def __init__(self, model, indices: list[int]):
        super().__init__()
        self.model, self.indices = model, list(indices)

    def forward(self, images):
        return tuple(self.model.branch_features(images, self.indices))


def branch_graph(model, index: int, size: tuple[int, int]) -> bytes:
    """The ONNX graph (bytes) of branch ``index``'s features: its preprocessing, backbone and extractor,
    exported at ``size`` with a dynamic batch; input ``images`` (float (B, 3, H, W) in [0, 1]; grey
    batches are repeated to 3 channels, as the branches' own preprocessing does)."""
    import tempfile

    _require("onnx", "onnxruntime", "onnxscript")
    with tempfile.TemporaryDirectory(prefix="fusion-engine-onnx-") as folder:
        path = Path(folder) / "features.onnx"
        _export_graph(_BranchFeatures(model.eval(), [index]), path, _example(3, *size), [f"features_{index}"])
        return path.read_bytes()


def onnx_runner(model, example=None, calibration=None):
    """``run(images) -> logits`` with onnxruntime, for ``runtimes.make_runner``; exported at ``example``'s size
    (static int8 with ``calibration`` data)."""
    session = session_for(model, tuple(example.shape[-2:]) if example is not None else None, calibration)
    channels = input_contract(model)["shape"][1]

    def run(images: torch.Tensor) -> torch.Tensor:
        x = to_channels(images.detach().float().cpu(), channels).numpy()
        return torch.from_numpy(session.run(["logits"], {INPUT_NAME: x})[0])

    return run


def read_metadata(path) -> dict:
    """The ``fusion_engine.*`` metadata of an exported model, JSON-decoded."""
    _require("onnxruntime")
    meta = onnx_session(path).get_modelmeta().custom_metadata_map
    return decode_metadata(meta, path)


def decode_metadata(meta: dict, path) -> dict:
    try:
        out = {k[len(META_PREFIX) :]: json.loads(v) for k, v in meta.items() if k.startswith(META_PREFIX)}
        out["class_names"], out["input"]["shape"]  # noqa: B018  (present, or KeyError)
    except (ValueError, KeyError, TypeError):
        raise ExportError(
            f"{path} is not an ONNX model exported by fusion-engine (no usable fusion_engine.* metadata)"
        ) from None
    return out


__all__ = [
    "export_onnx",
    "write_onnx",
    "branch_graph",
    "session_for",
    "onnx_runner",
    "parity",
    "read_metadata",
    "input_contract",
    "sign_onnx",
    "verify_onnx",
    "signature_path",
]
