"""Two-process gloo runs on the CPU: sharded extraction, DDP finetune, a killed worker."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import fusion_engine
from fusion_engine import Engine
from fusion_engine.core.data import load_dataset
from fusion_engine.training.feature_cache import FeatureCache

CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32},
        {"name": "timm", "model": "test_efficientnet", "input_size": 32},
    ],
    "fusion": "concat",
}


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _digits_npz(path: Path, n: int) -> Path:
    d = load_dataset("digits")
    idx = np.arange(0, 1797, 1797 // n)[:n]
    x = np.stack([d[i][0][0].numpy() for i in idx])
    np.savez(path, x=x, y=d.targets[idx])
    return path


def _train(tmp_path, *args, timeout=240):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    cmd = [sys.executable, "-m", "fusion_engine", "train", "--config", str(config), "--nproc", "2", "-q", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_sharded_extraction_matches_single_process(tmp_path):
    data = _digits_npz(tmp_path / "d.npz", 300)
    cache = tmp_path / "cache"
    result = _train(
        tmp_path,
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(cache.glob(".*")), "shard and temporary files must be gone"
    # the same model, built the way the CLI builds it, hits the cache the 2-process run filled ...
    import torch

    torch.manual_seed(3)
    dataset = load_dataset(data)
    model = Engine.from_plugins().build(CONFIG, class_names=dataset.classes)
    shared = FeatureCache(cache, runtime="auto")  # train's default runtime; its graphs are in the cache folder
    from fusion_engine.core.data import stratified_split

    train, test = stratified_split(dataset, 0.2, 3)
    cached = shared.features(model, test, progress=False)
    assert shared.stats == {"hits": 2, "extracted": 0, "extract_seconds": 0.0}
    # ... and its features equal a fresh single-process extraction
    fresh = FeatureCache(cache, enabled=False, runtime="auto").features(model, test, progress=False)
    for a, b in zip(cached, fresh):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_distributed_finetune_writes_a_loadable_artifact(tmp_path):
    data = _digits_npz(tmp_path / "d.npz", 200)
    out = tmp_path / "run"
    result = _train(
        tmp_path,
        "--data",
        str(data),
        "--mode",
        "finetune",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGABRT" not in result.stderr and "Traceback" not in result.stderr
    assert not Path(str(out) + ".checkpoint").exists()
    model = fusion_engine.load(out)
    assert len(model.history["epochs"]) == 2
    x = np.load(data)["x"][:5]
    assert model.predict(x).shape == (5,)


def _worker_pids(parent: int) -> list[int]:
    """Descendant processes of ``parent`` whose environment says RANK=1."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ and b"LOCAL_RANK=1" in environ and _descends(status.parent.name, parent):
            found.append(int(status.parent.name))
    return found


def _descends(pid: str, ancestor: int) -> bool:
    while pid not in ("0", "1"):
        if int(pid) == ancestor:
            return True
        try:
            pid = next(
                line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("PPid:")
            ).split()[1]
        except (OSError, StopIteration):
            return False
    return False


def test_killed_worker_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    data = _digits_npz(tmp_path / "d.npz", 200)
    out = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    cmd = [
        sys.executable,
        "-m",
        "fusion_engine",
        "train",
        "--config",
        str(config),
        "--nproc",
        "2",
        "-q",
        "--data",
        str(data),
        "--mode",
        "finetune",
        "--epochs",
        "200",
        "--batch-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = Path(str(out) + ".checkpoint") / "state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no checkpoint appeared"
    victims = _worker_pids(process.pid)
    assert victims, "rank 1 worker not found"
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "worker rank 1 was killed by SIGKILL" in stderr
    saved = json.loads(state.read_text())
    assert saved["epoch"] >= 1
    assert not out.exists()
