"""Batch prediction over image files and folders, streamed through a DataLoader, with torch or onnxruntime;
``format_predictions`` (names escaped with ``errors.printable``)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion_engine.core.data import IMAGE_EXTENSIONS, FolderImageDataset, collate_images
from fusion_engine.core.network import input_size_for
from fusion_engine.errors import DataError, ExportError, printable
from fusion_engine.runtime.export import (
    INPUT_NAME,
    decode_metadata,
    onnx_session,
    session_for,
    to_channels,
    verify_onnx,
)


def format_predictions(results: list[dict]) -> str:
    """``predict``'s text output: one line per image, ``IMAGE: class probability, ...`` (names escaped)."""
    return "\n".join(
        printable(r["image"]) + ": " + ", ".join(f"{printable(p['class'])} {p['probability']:.3f}" for p in r["top"])
        for r in results
    )


def image_files(paths) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under named folders."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; give image files or folders of images")
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


@torch.inference_mode()
def _top_k(files, size, probabilities, class_names, *, top_k: int, batch_size: int, workers: int) -> list[dict]:
    """Top-k classes per image file: images read lazily, resized to ``size``, scored by ``probabilities``."""
    dataset = FolderImageDataset(Path("/"), [str(f.resolve()) for f in files], np.zeros(len(files)), ["?"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=functools.partial(collate_images, size=size)
    )
    k = max(1, min(top_k, len(class_names)))
    results, row = [], 0
    for images, _ in loader:
        values, indices = probabilities(images).topk(k, dim=1)
        for v, i in zip(values.tolist(), indices.tolist()):
            results.append(
                {"image": str(files[row]), "top": [{"class": class_names[c], "probability": p} for p, c in zip(v, i)]}
            )
            row += 1
    return results


def predict_files(model, paths, *, top_k: int = 3, batch_size: int = 64, workers: int = 0) -> list[dict]:
    """Top-k classes per image with torch; memory stays bounded (images are read batch by batch)."""
    model.eval()
    return _top_k(
        image_files(paths),
        input_size_for(model),
        lambda x: torch.softmax(model(x).float(), dim=1),
        model.class_names,
        top_k=top_k,
        batch_size=batch_size,
        workers=workers,
    )


def predict_onnx_files(
    path, paths, *, top_k: int = 3, batch_size: int = 64, workers: int = 0, public_key=None
) -> list[dict]:
    """``predict`` with onnxruntime: top-k classes per image file, images resized to the graph's input size.

    ``path`` is an .onnx file written by ``export_onnx``, or a loaded model (exported in memory). With
    ``public_key`` the file must carry a valid ``FILE.onnx.sig`` by that key (``verify_onnx``), and
    onnxruntime gets exactly the bytes that were checked; else ArtifactError.
    """
    if isinstance(path, nn.Module):
        session = session_for(path)
    else:
        source = verify_onnx(path, public_key) if public_key else path
        try:
            session = onnx_session(source)
        except ExportError:
            raise
        except Exception as e:  # onnxruntime reports unreadable or invalid files in its own exception types
            raise ExportError(f"onnxruntime cannot load {path}: {e}") from None
    meta = decode_metadata(session.get_modelmeta().custom_metadata_map, path)
    _, channels, height, width = meta["input"]["shape"]

    def probabilities(images):
        feed = {INPUT_NAME: to_channels(images, channels).numpy()}
        return torch.from_numpy(session.run(["probabilities"], feed)[0])

    return _top_k(
        image_files(paths),
        (height, width),
        probabilities,
        meta["class_names"],
        top_k=top_k,
        batch_size=batch_size,
        workers=workers,
    )
