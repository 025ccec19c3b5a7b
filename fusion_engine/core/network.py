"""The fused network: per-branch preprocessing -> backbone -> extractor, then fusion -> logits.

This is the model as a torch module (inference only); ``api.classifier.FusedClassifier`` adds
training, evaluation and saving on top of it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusion_engine.core.data import image_batch
from fusion_engine.core.preprocess import Preprocess, data_config_key
from fusion_engine.errors import NotFittedError, PluginError


class Branch(nn.Module):
    """One backbone with its extractor; ``forward`` takes preprocessed images."""

    def __init__(self, name: str, backbone: nn.Module, extractor: nn.Module, frozen: bool = True):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.extractor = extractor
        self.uses_stages = bool(getattr(extractor, "uses_stages", False))
        self.frozen = frozen
        self.feature_dim: int | None = None
        if frozen:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_stages(x) if self.uses_stages else self.backbone(x)
        return self.extractor(out)

    def extract(self, backbone_output) -> torch.Tensor:
        """Features from a backbone output computed elsewhere (stage list or final features)."""
        if isinstance(backbone_output, list) and not self.uses_stages:
            backbone_output = backbone_output[-1]
        return self.extractor(backbone_output)


class FusedNetwork(nn.Module):
    """Several backbones fused into one classifier that takes plain images.

    Input: float images in [0, 1], (B, C, H, W), grey or RGB, any size; each branch
    resizes and normalises them to its own backbone's data config.

    Besides its layers it carries what a saved model records: ``baselines`` (per-branch and
    handcrafted probes, a torch module saved with the weights), ``compression`` (the steps
    applied, replayed on load), ``components`` (who offered each component), ``history`` and
    ``metrics`` of training, and ``manifest`` when it was loaded from a RUN_DIR. ``fitted`` says
    whether it was trained (``fit`` ran) or loaded from a RUN_DIR; ``predict`` refuses otherwise.
    """

    def __init__(self, branches: list[Branch], fusion: nn.Module, config, class_names=None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion
        self.config = config
        self.class_names = list(class_names) if class_names is not None else None  # set by fit() from the data
        keys, self.preprocess_index = {}, []
        preprocessors = []
        for branch in branches:
            key = data_config_key(branch.backbone.data_config)
            if key not in keys:
                keys[key] = len(preprocessors)
                preprocessors.append(Preprocess(branch.backbone.data_config))
            self.preprocess_index.append(keys[key])
        self.preprocessors = nn.ModuleList(preprocessors)
        self.baselines: nn.Module | None = None
        self.compression: list[dict] = []
        self.components: list[dict] = []
        self.history: dict = {}
        self.metrics: dict = {}
        self.manifest = None
        self.fitted: bool = False  # set by fit() and by loading a RUN_DIR

    @property
    def branch_names(self) -> list[str]:
        return [b.name for b in self.branches]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def shared_backbone_groups(self) -> list[list[int]]:
        """Groups (of two or more) of branch indices that share one backbone module."""
        groups: dict[int, list[int]] = {}
        for i, branch in enumerate(self.branches):
            groups.setdefault(id(branch.backbone), []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def share_backbones(self, groups: list[list[int]]) -> None:
        """Make each group's branches use its first branch's backbone module."""
        for group in groups:
            for i in group[1:]:
                self.branches[i].backbone = self.branches[group[0]].backbone

    def train(self, mode: bool = True):
        """Frozen backbones stay in eval mode (batch-norm statistics untouched)."""
        super().train(mode)
        for branch in self.branches:
            if branch.frozen:
                branch.backbone.eval()
        return self

    def branch_features(self, images: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        """One (B, D_i) feature tensor per branch (or per branch in ``indices``).

        Work is shared: each distinct preprocessing runs once, and a backbone module used by
        several branches (same weights) runs once per input.
        """
        indices = range(len(self.branches)) if indices is None else indices
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[tuple[int, int], object] = {}
        needs_stages = {}
        for i in indices:
            branch = self.branches[i]
            key = (id(branch.backbone), self.preprocess_index[i])
            needs_stages[key] = needs_stages.get(key, False) or branch.uses_stages
        features = []
        for i in indices:
            branch, p = self.branches[i], self.preprocess_index[i]
            if p not in inputs:
                inputs[p] = self.preprocessors[p](images)
            key = (id(branch.backbone), p)
            if key not in outputs:
                outputs[key] = (
                    branch.backbone.forward_stages(inputs[p]) if needs_stages[key] else branch.backbone(inputs[p])
                )
            features.append(branch.extract(outputs[key]))
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.branch_features(images)
        if self.config.flip_average:  # the mean of each image's and its mirror image's features
            features = [(a + b) / 2 for a, b in zip(features, self.branch_features(images.flip(-1)))]
        return self.fusion(features)

    def check_fitted(self) -> None:
        """NotFittedError unless the model was trained or loaded (or its fitted fusion was fitted directly)."""
        fusion_fitted = getattr(self.fusion, "requires_fit", False) and bool(getattr(self.fusion, "fitted", False))
        if not (self.fitted or fusion_fitted):
            raise NotFittedError(
                "this model has not been trained yet, so its predictions would be random: call fit(data) first, "
                "or load a trained model with fusion_engine.load(RUN_DIR)"
            )

    @torch.inference_mode()
    def predict_proba(self, images, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, num_classes); a single image gives (1, num_classes).

        ``images``: a PIL image, an image file path, one image or a batch as a numpy array or torch
        tensor (uint8 0..255 or float 0..1; (H, W), (H, W, C), (C, H, W), (N, H, W[, C]), (N, C, H, W)),
        or a list of any of these single images, mixed sizes allowed (``core.data.image_batch`` reads
        them). Every image is resized to the model's input size (``input_size_for``) first, as training
        batches are. NotFittedError before ``fit`` (or loading a trained model).
        """
        self.check_fitted()
        x = image_batch(images, size=input_size_for(self))
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [
            torch.softmax(self(x[i : i + batch_size].to(device)).float(), dim=1).cpu()
            for i in range(0, len(x), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), dtype=np.float32)

    def predict(self, images, batch_size: int = 64) -> np.ndarray:
        """Predicted class indices (N,) for the inputs ``predict_proba`` takes; a single image gives (1,)."""
        return self.predict_proba(images, batch_size=batch_size).argmax(axis=1)


def input_size_for(model) -> tuple[int, int]:
    """The largest branch input size: images of mixed sizes are resized to it before batching."""
    sizes = [tuple(b.backbone.data_config["input_size"][-2:]) for b in model.branches]
    return max(sizes, key=lambda s: s[0] * s[1])


@torch.no_grad()
def measure_feature_dims(model: FusedNetwork) -> list[int]:
    """Each branch's feature width, measured with one dummy image at the branch's input size."""
    was_training = model.training
    model.eval()
    dims = []
    for branch, index in zip(model.branches, model.preprocess_index):
        channels, height, width = branch.backbone.data_config["input_size"]
        features = branch(model.preprocessors[index](torch.zeros(1, channels, height, width)))
        if features.dim() != 2:
            raise PluginError(
                f"branch '{branch.name}' gives features of shape {tuple(features.shape)}; "
                "an extractor must return (batch, dim)"
            )
        branch.feature_dim = int(features.shape[1])
        dims.append(branch.feature_dim)
    model.train(was_training)
    return dims
