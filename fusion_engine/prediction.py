"""Batch prediction over image files and folders, streamed through a DataLoader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, FolderImageDataset
from .errors import DataError
from .features import make_loader


def image_files(paths) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under named folders."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; give image files or folders of images")
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


@torch.inference_mode()
def predict_files(model, paths, *, top_k: int = 3, batch_size: int = 64, workers: int = 0) -> list[dict]:
    """Top-k classes per image; memory stays bounded (images are read lazily, batch by batch)."""
    files = image_files(paths)
    dataset = FolderImageDataset(Path("/"), [str(f.resolve()) for f in files], np.zeros(len(files)), ["?"])
    model.eval()
    results = []
    k = max(1, min(top_k, model.num_classes))
    row = 0
    for images, _ in make_loader(dataset, model, batch_size, workers):
        probs = torch.softmax(model(images).float(), dim=1)
        values, indices = probs.topk(k, dim=1)
        for v, i in zip(values.tolist(), indices.tolist()):
            results.append({"image": str(files[row]), "top": [{"class": model.class_names[c], "probability": p}
                                                            for p, c in zip(v, i)]})
            row += 1
    return results
