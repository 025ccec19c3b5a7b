"""Shared fixtures for fusion-engine's tests.

- ``shared_dir``: the shared folder with real weights (``../shared`` next to the repo, or
  ``$FUSION_ENGINE_SHARED``); tests that use it skip when it is absent.
- ``register_plugin``: make a plugin visible to every ``Engine.from_plugins()`` for one test,
  undone afterwards; the public fixture of :mod:`fusion_engine.testing`, imported here.
- ``fake_distribution``: write an installed distribution (``NAME-VERSION.dist-info`` with an
  ``[fusion_engine]`` entry point) plus its module into a folder and put it on ``sys.path``.
- ``digits_split``: scikit-learn's digits, split 80/20 (stratified, seed 0) into train and held-out.
- ``train_and_save``: ``train_and_save(engine, config, train, folder, epochs=, lr=)`` fits a fused
  model in frozen mode (no cache, no baselines, quiet) and saves it as a RUN_DIR.
- Every test runs offline (``HF_HUB_OFFLINE=1``), single-threaded, and without the
  ``FUSION_ENGINE_*`` variables of the calling shell.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

# Before torch / huggingface_hub are imported: hub constants are read once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fusion_engine.testing import register_plugin  # noqa: E402,F401  (a fixture: tests use it by name)

torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]
ENGINE_ENV_VARS = (
    "FUSION_ENGINE_LOAD_PLUGINS",
    "FUSION_ENGINE_DISABLE_PLUGINS",
    "FUSION_ENGINE_STRICT_PLUGINS",
    "FUSION_ENGINE_WEIGHTS_DIR",
)


def shared_path() -> Path:
    """``$FUSION_ENGINE_SHARED``, else the ``shared`` folder beside the repository."""
    return Path(os.environ.get("FUSION_ENGINE_SHARED") or REPO.parent / "shared")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    """Offline, one thread, no plugin/weights settings inherited from the shell."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ENGINE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def shared_dir() -> Path:
    """The shared folder (real weights under ``weights/``); skips the test when it is absent."""
    path = shared_path()
    if not (path / "weights" / "index.json").is_file():
        pytest.skip(f"shared weights not found at {path / 'weights'} (set FUSION_ENGINE_SHARED to the shared folder)")
    return path


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for running ``python -m fusion_engine`` in a subprocess, offline and hermetic."""
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV_VARS and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """``fake_distribution(dist, version, module_source, ...)`` -> the folder holding it.

    Writes ``<dist>-<version>.dist-info`` (METADATA, entry_points.txt with
    ``[fusion_engine] <entry_point> = <module>``) and ``<module>.py`` into ``tmp_path/site``,
    prepends that folder to ``sys.path`` and clears importlib's caches. The module is removed
    from ``sys.modules`` afterwards.
    """
    site = tmp_path / "site"
    site.mkdir()
    modules: list[str] = []

    def make(
        dist: str, version: str, module_source: str, *, module: str | None = None, entry_point: str | None = None
    ) -> Path:
        module = module or dist.replace("-", "_") + "_plugin"
        entry_point = entry_point or dist.replace("-", "_")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\nSummary: test plugin {dist}\n"
        )
        (info / "entry_points.txt").write_text(f"[fusion_engine]\n{entry_point} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(module_source))
        modules.append(module)
        importlib.invalidate_caches()
        return site

    monkeypatch.syspath_prepend(str(site))
    yield make
    for module in modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


@pytest.fixture(scope="session")
def digits_split():
    """(train, held-out): scikit-learn's digits split 80/20, stratified with seed 0."""
    from fusion_engine.core.data import load_dataset, stratified_split

    return stratified_split(load_dataset("digits"), 0.2, 0)


@pytest.fixture(scope="session")
def train_and_save():
    """A function: fit ``config`` on ``train`` quietly (seed 0, frozen, no cache, no baselines), save to ``folder``."""
    from fusion_engine.artifacts.store import save

    def fit_and_save(engine, config, train, folder, *, epochs: int, lr: float) -> Path:
        torch.manual_seed(0)
        model = engine.build(config, class_names=train.classes)
        model.fit(
            train, epochs=epochs, lr=lr, baselines=False, use_cache=False, progress=False, log=lambda *a, **k: None
        )
        save(model, folder)
        return Path(folder)

    return fit_and_save
