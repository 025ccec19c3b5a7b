"""FusedClassifier: the fused network with the verbs a user calls on it (fit, evaluate, save)."""

from __future__ import annotations

from fusion_engine.artifacts.store import save
from fusion_engine.core.network import FusedNetwork
from fusion_engine.training.evaluation import evaluate
from fusion_engine.training.fit import fit


class FusedClassifier(FusedNetwork):
    """A fused model that trains, evaluates and saves itself; built by ``Engine.build``.

    Load a saved one with ``fusion_engine.load(RUN_DIR)`` (or ``Engine.load``).
    """

    def fit(self, train, val=None, **options) -> dict:
        """Train on ``train`` (folder, .npz, arrays, Dataset or "digits"); see ``training.fit.fit``."""
        return fit(self, train, val, **options)

    def evaluate(self, data, **options) -> dict:
        """Held-out report: fused model, each branch's probe, handcrafted baseline; see ``training.evaluation``."""
        return evaluate(self, data, **options)

    def save(self, folder, **options):
        """Write a pickle-free artifact folder atomically; see ``artifacts.store.save``."""
        return save(self, folder, **options)
