"""DataLoaders that batch a dataset's images at a model's input size."""

from __future__ import annotations

import functools

import torch

from fusion_engine.core.data import collate_images
from fusion_engine.core.network import input_size_for


def make_loader(dataset, model, batch_size: int, num_workers: int = 0, shuffle=False, generator=None):
    """Batches of ``(images, labels)``; images of mixed sizes are resized to the model's largest input size."""
    collate = functools.partial(collate_images, size=input_size_for(model))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,
    )
