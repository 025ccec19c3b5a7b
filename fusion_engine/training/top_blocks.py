"""Top-block fine-tuning on cached trunk activations (``TrainConfig.train_blocks``, ``train --train-blocks K``).

In frozen mode each branch whose backbone can be split (``split(K)``: timm EfficientNet-family, MobileNetV3 and
ResNet models) is cut into a trunk and its last K stages, the top. The activations entering the top are extracted
once through the feature cache (flattened float32, memory-mapped, keyed by the branch's feature key plus K), then the
tops and the fusion head train on them for many epochs: an epoch costs a pass through the tops only. Branches that
cannot be split (handcrafted ones) keep their cached features. The tops are the backbones' own modules, so the
trained model is an ordinary FusedClassifier: no cache at inference, and export, compression and signing see plain
weights. A backbone shared by several branches trains one top for all of them.

Choices:

- Batch norm: the tops stay in eval mode, the running statistics frozen (the trunk activations were made with them,
  and inference uses them) while the affine scale and shift train; dropout and drop-path are off too, so a top
  computes the same function in training as at inference.
- AdamW with cosine decay: the head at ``lr``, the tops at ``backbone_lr`` (10x lower by default, so pretrained
  weights move gently); ``weight_decay`` on the head and on the tops' convolution weights, none on their norms and
  biases; label smoothing and gradient clipping as for the head; batches of ``batch_size``.
- Early stopping on fit()'s validation split: the epoch with the best validation accuracy (head and tops together)
  is kept; ``patience`` epochs without a gain stop training.
- Independent branches (``independent_branches``, ``train --independent-branches``; fusions with a head per branch,
  such as vote): each branch's top and head learn from that branch's own loss and keep their own best epoch, as if
  each backbone were fine-tuned alone; the fusion then combines them. Joint training through one head lets the
  strongest branch carry the loss and starves the others (on CIFAR, a MobileNetV1 top trained jointly probes
  at 0.66, alone at 0.83); independent training keeps every branch at its best, as a late-fusion ensemble does.
- Views (``feature_views``, ``train --views flip``): the trunk activations of each view of the training images are
  cached too (one more trunk pass per view), and every epoch reads each image from the original or a view, drawn
  at random: data augmentation at the price of a cache read.
- ``flip_average`` (``train --views flip,flip-average``): the model averages each image's features with its mirror
  image's, so validation (and early stopping) scores the averaged features too, from the trunk activations of the
  mirrored validation images.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F

import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.tensors import state_tensors
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ConfigError
from fusion_engine.runtime.runtimes import fast_memory_format
from fusion_engine.training.config import TrainConfig
from fusion_engine.training.evaluation import logits_from_features, probe_logits
from fusion_engine.training.feature_cache import branch_key
from fusion_engine.training.views import mean_of_views

ACTIVATIONS_VERSION = "trunk-activations-v1"


class Top:
    """One backbone's split: its trunk, its top, the branches it feeds and the shape of the activation between."""

    def __init__(self, trunk, top, preprocess: int, branches: list[int]):
        self.trunk, self.top, self.preprocess, self.branches = trunk, top, preprocess, branches
        self.shape: tuple[int, ...] = ()


class TopBlocks:
    """The trainable tops of ``model``'s branches (``blocks`` stages each) and the branches left frozen."""

    def __init__(self, model, blocks: int, independent: bool = False):
        if getattr(model.fusion, "requires_fit", False):
            raise ConfigError(
                f"fusion '{model.config.fusion.name}' is fitted, not trained by gradient, so it cannot train top "
                "blocks with it; use --train-blocks 0, or a trained fusion such as concat"
            )
        if distributed.active():
            raise ConfigError("--train-blocks trains in one process; drop --nproc")
        if independent and len(getattr(model.fusion, "branch_heads", ())) != len(model.branches):
            raise ConfigError(
                f"fusion '{model.config.fusion.name}' has one head over all branches, so they cannot train "
                "independently; use a fusion with a head per branch (vote), or drop --independent-branches"
            )
        self.model, self.blocks, self.independent = model, blocks, independent
        self.tops: list[Top] = []
        self.frozen: list[int] = []  # branches without a split: their cached features
        by_backbone: dict[tuple[int, int], Top] = {}
        for i, branch in enumerate(model.branches):
            if not hasattr(branch.backbone, "split"):
                self.frozen.append(i)
                continue
            if branch.uses_stages:
                raise ConfigError(
                    f"branch '{branch.name}' uses a multi-stage extractor, which needs every stage's map; "
                    "top blocks train with single-map extractors (avg, gem, ...); use --train-blocks 0"
                )
            key = (id(branch.backbone), model.preprocess_index[i])
            if key not in by_backbone:
                by_backbone[key] = Top(*branch.backbone.split(blocks), model.preprocess_index[i], [])
                self.tops.append(by_backbone[key])
            by_backbone[key].branches.append(i)
        if not self.tops:
            raise ConfigError(
                "--train-blocks: no branch has a backbone that can be split into trunk and top blocks (timm "
                "EfficientNet, MobileNet and ResNet models can); use --train-blocks 0"
            )
        if independent:
            shared = [top for top in self.tops if len(top.branches) > 1]
            if shared:
                names = ", ".join(model.branches[i].name for i in shared[0].branches)
                raise ConfigError(
                    f"branches {names} share one backbone, whose top cannot train on two losses apart; give each "
                    "branch its own backbone, or drop --independent-branches"
                )
        with torch.no_grad():
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            for top in self.tops:
                channels = model.branches[top.branches[0]].backbone.data_config["input_size"][0]
                dummy = torch.zeros(1, channels, *input_size_for(model), device=device)
                top.shape = tuple(top.trunk(model.preprocessors[top.preprocess](dummy)).shape[1:])
            model.train(was_training)
        self.top_modules = torch.nn.ModuleList(top.top for top in self.tops)
        self.params = list(self.top_modules.parameters())  # a shared module's parameters once

    # ------------------------------------------------------------------ extraction

    def keys(self, data_digest: str) -> list[str]:
        """Cache keys: one per top (the branch's feature key plus K), then the frozen branches' feature keys."""
        keys = []
        for top in self.tops:
            parts = {
                "version": ACTIVATIONS_VERSION,
                "branch": branch_key(self.model, top.branches[0], data_digest),
                "train_blocks": self.blocks,
            }
            keys.append(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32])
        return keys + [branch_key(self.model, i, data_digest) for i in self.frozen]

    def inputs(self, cache, dataset, config: TrainConfig, device, progress: bool = True) -> list[np.ndarray]:
        """What training reads, one array per branch: the trunk activations (N, C*H*W) its top takes (one array
        shared by the branches of one backbone), or a frozen branch's features; cached, one pass extracts all."""
        if cache.runtime not in ("auto", "torch"):
            raise ConfigError(
                f"--train-blocks extracts trunk activations in float32 torch; drop --extract-runtime {cache.runtime}"
            )
        model = self.model
        n = len(dataset)
        shapes = [(n, int(np.prod(top.shape))) for top in self.tops]
        shapes += [(n, model.branches[i].feature_dim) for i in self.frozen]
        keys = self.keys(dataset.digest()) if cache.enabled else [""] * len(shapes)  # no cache: nothing to hash
        names = [f"trunk of branch {top.branches[0]} ({model.branches[top.branches[0]].name})" for top in self.tops]
        names += [f"branch {i} ({model.branches[i].name})" for i in self.frozen]

        @torch.inference_mode()
        def fill(indices, buffers):
            loader = make_loader(dataset, model, config.batch_size, config.num_workers)
            frozen = [self.frozen[j - len(self.tops)] for j in indices if j >= len(self.tops)]
            label = f"extracting trunk activations (top {self.blocks} blocks)"
            with Progress(n, label, progress) as bar, fast_memory_format(model, device) as memory_format:
                model.eval()
                row = 0
                for images, _ in loader:
                    images = images.to(device).contiguous(memory_format=memory_format)
                    features = iter(model.branch_features(images, frozen) if frozen else [])
                    for j, buffer in zip(indices, buffers):
                        if j < len(self.tops):
                            top = self.tops[j]
                            out = top.trunk(model.preprocessors[top.preprocess](images)).reshape(len(images), -1)
                        else:
                            out = next(features)
                        buffer[row : row + len(images)] = out.float().cpu().numpy()
                    row += len(images)
                    bar.update(len(images))

        arrays = cache.arrays(keys, shapes, fill, names)
        out: list = [None] * len(model.branches)
        for top, array in zip(self.tops, arrays):
            for i in top.branches:
                out[i] = array
        for i, array in zip(self.frozen, arrays[len(self.tops) :]):
            out[i] = array
        return out

    # ------------------------------------------------------------------ training

    def branch_features(
        self, inputs: list, rows, device, memory_format=torch.contiguous_format, views: list = (), choice=None
    ) -> list[torch.Tensor]:
        """Every branch's features for ``rows`` of ``inputs``: through the tops, or read from the cache. With
        ``views`` (more such input lists, one per image view), row ``j`` is read from ``inputs`` where
        ``choice[j]`` is 0 and from ``views[choice[j] - 1]`` otherwise."""
        sources = [inputs, *views]

        def read(i: int) -> torch.Tensor:
            if choice is None:
                return torch.from_numpy(np.array(inputs[i][rows]))  # a writable copy
            batch = np.empty((len(rows), inputs[i].shape[1]), dtype=np.float32)
            for v, source in enumerate(sources):
                picked = choice == v
                batch[picked] = source[i][rows[picked]]
            return torch.from_numpy(batch)

        features: list = [None] * len(self.model.branches)
        for top in self.tops:
            batch = read(top.branches[0]).to(device)
            out = top.top(batch.view(len(batch), *top.shape).contiguous(memory_format=memory_format))
            for i in top.branches:
                features[i] = self.model.branches[i].extract(out)
        for i in self.frozen:
            features[i] = read(i).to(device)
        return features

    def features(self, inputs: list, device) -> list[np.ndarray]:
        """Every branch's (N, D) features with the tops as they are now."""
        with fast_memory_format(self.top_modules, device) as memory_format:
            return self._features(inputs, device, memory_format)

    @torch.no_grad()
    def _features(self, inputs: list, device, memory_format, batch_size: int = 256) -> list[np.ndarray]:
        self.top_modules.eval()
        chunks = [
            [
                f.float().cpu().numpy()
                for f in self.branch_features(inputs, slice(s, s + batch_size), device, memory_format)
            ]
            for s in range(0, len(inputs[0]), batch_size)
        ]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.model.branches))]

    def train(
        self,
        inputs,
        y,
        val_inputs,
        y_val,
        config: TrainConfig,
        device,
        progress: bool = False,
        views: list = (),
        val_mirrored: list | None = None,
    ) -> list[dict]:
        """Train the tops and the fusion head together (see the module docstring); returns the epochs' history.
        ``views``: the inputs of the training images' views (``inputs`` of a ViewDataset each); every epoch
        reads each image from the original or one of its views, drawn at random. ``val_mirrored``: the inputs of
        the mirrored validation images, to score flip-averaged features."""
        with fast_memory_format(self.top_modules, device) as memory_format:  # channels_last on the CPU: 2x faster
            return self._train(
                inputs, y, val_inputs, y_val, config, device, memory_format, progress, list(views), val_mirrored
            )

    def units(self) -> list[list[torch.nn.Module]]:
        """What trains and stops early as one: the head and every top together, or with independent branches each
        branch's own head (``fusion.branch_heads[i]``) and top."""
        head = self.model.fusion
        if not self.independent:
            return [[head, self.top_modules]]
        top_of = {i: top.top for top in self.tops for i in top.branches}
        return [[head.branch_heads[i], *([top_of[i]] if i in top_of else [])] for i in range(len(head.branch_heads))]

    def loss(self, features: list, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The fused prediction's loss, or with independent branches the sum of each branch head's own loss."""
        head = self.model.fusion
        if not self.independent:
            return F.cross_entropy(head(features), y, label_smoothing=label_smoothing)
        return sum(
            F.cross_entropy(h(f), y, label_smoothing=label_smoothing) for h, f in zip(head.branch_heads, features)
        )

    def scores(self, features: list, y, device) -> list[float]:
        """Validation accuracy of each unit (see :meth:`units`): the fused model's, or each branch head's."""
        head = self.model.fusion
        if not self.independent:
            return [float((logits_from_features(head, features, device=device).argmax(1) == y).mean())]
        return [
            float((probe_logits(h, f, device=device).argmax(1) == y).mean())
            for h, f in zip(head.branch_heads, features)
        ]

    def _train(
        self, inputs, y, val_inputs, y_val, config: TrainConfig, device, memory_format, progress, views, val_mirrored
    ) -> list[dict]:
        head = self.model.fusion
        self.top_modules.to(device).eval()  # batch norm keeps its running statistics
        head.to(device)
        decay = [p for p in self.params if p.dim() > 1]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in head.parameters() if p.requires_grad], "lr": config.lr},
                {"params": decay, "lr": config.backbone_lr},
                {"params": [p for p in self.params if p.dim() <= 1], "lr": config.backbone_lr, "weight_decay": 0.0},
            ],
            weight_decay=config.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
        y_val = np.asarray(y_val)
        generator = torch.Generator().manual_seed(config.seed)
        units = self.units()
        unit_params = [[p for m in unit for p in m.parameters()] for unit in units]
        best = [-1.0] * len(units)
        best_state: list = [None] * len(units)
        stale, epochs = [0] * len(units), []
        bar = Progress(config.epochs, f"training top {self.blocks} blocks and head", progress, unit="epoch")
        for p in self.params:
            p.requires_grad_(True)
        try:
            for epoch in range(config.epochs):
                head.train()
                order = torch.randperm(len(y_t), generator=generator).numpy()
                drawn = torch.randint(len(views) + 1, (len(y_t),), generator=generator).numpy() if views else None
                total = 0.0
                for start in range(0, len(order), config.batch_size):
                    rows = np.sort(order[start : start + config.batch_size])
                    choice = None if drawn is None else drawn[rows]
                    features = self.branch_features(inputs, rows, device, memory_format, views, choice)
                    loss = self.loss(features, y_t[rows].to(device), config.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        for params in unit_params:  # each unit clipped on its own: independent branches stay so
                            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    total += float(loss.detach()) * len(rows)
                scheduler.step()
                val_features = self._features(val_inputs, device, memory_format)
                if val_mirrored is not None:  # scored as the model predicts: each image with its mirror image
                    val_features = mean_of_views(val_features, self._features(val_mirrored, device, memory_format))
                scores = self.scores(val_features, y_val, device)
                entry = {"epoch": epoch + 1, "loss": round(total / len(order), 5)}
                if self.independent:
                    entry["branch_val_accuracy"] = [round(a, 5) for a in scores]
                    fused = logits_from_features(head, val_features, device=device).argmax(1)
                    entry["val_accuracy"] = round(float((fused == y_val).mean()), 5)
                else:
                    entry["val_accuracy"] = round(scores[0], 5)
                epochs.append(entry)
                for u, (unit, score) in enumerate(zip(units, scores)):
                    if score > best[u]:
                        best[u], best_state[u], stale[u] = score, [state_tensors(m) for m in unit], 0
                    else:
                        stale[u] += 1
                bar.update(1, val_accuracy=entry["val_accuracy"], best=max(best))
                if min(stale) >= config.patience:
                    break
        finally:
            for p in self.params:
                p.requires_grad_(False)  # the branches stay frozen
            bar.close()
        for unit, states in zip(units, best_state):
            for module, state in zip(unit, states):
                module.load_state_dict(state)
        return epochs
