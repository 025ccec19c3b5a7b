"""Inference runtimes (torch, channels_last, bf16, compile) agree with the model; ``fusion-engine bench``
measures each in its own process; extraction runs channels_last on the CPU and gives the same features."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import torch

from fusion_engine import ConfigError, Engine
from fusion_engine.cli.main import main
from fusion_engine.core.loader import make_loader
from fusion_engine.runtime.runtimes import RUNTIMES, fast_memory_format, make_runner, runtime_name
from fusion_engine.training.feature_cache import FeatureCache

CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32},
        {"name": "timm", "model": "test_efficientnet", "input_size": 24},
    ],
    "fusion": "concat",
}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture
def model(engine):
    torch.manual_seed(0)
    return engine.build(CONFIG, num_classes=10).eval()


@pytest.mark.parametrize(
    "runtime, atol", [("torch", 0), ("channels_last", 1e-4), ("bf16", 0.15), ("bf16_channels_last", 0.15)]
)
def test_runtimes_agree_with_the_model(model, runtime, atol):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images)
    got = make_runner(model, runtime)(images)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="the onnx runtime needs fusion-engine[onnx]",
)
def test_onnx_runtime_agrees_with_the_model(model):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(images)
    run = make_runner(model, "onnx", example=images)
    torch.testing.assert_close(run(images), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(run(images[:1]), expected[:1], atol=1e-4, rtol=0)  # another batch size


def test_unknown_runtime_lists_the_valid_ones(model):
    with pytest.raises(ConfigError, match="unknown runtime 'fast'; valid: " + ", ".join(RUNTIMES)):
        make_runner(model, "fast")


def test_extraction_runs_channels_last_on_the_cpu_and_restores_the_model(model):
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with fast_memory_format(model, "cpu") as memory_format:
        assert memory_format is torch.channels_last
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous()
    with torch.inference_mode(), fast_memory_format(model, "cpu"):  # as extraction uses it
        pass
    assert not conv.weight.is_inference()
    conv.weight.requires_grad_(True)  # fine-tuning after a frozen extraction still works
    with fast_memory_format(model, "cuda") as memory_format:  # slower on GPUs: nothing changes there
        assert memory_format is torch.contiguous_format and conv.weight.is_contiguous()
    with fast_memory_format(torch.nn.Linear(3, 2), "cpu") as memory_format:
        assert memory_format is torch.contiguous_format


def test_channels_last_extraction_gives_the_features_of_nchw(model, digits_split):
    train, _ = digits_split
    part = train.subset(list(range(40)))
    features = FeatureCache(enabled=False).features(model, part, batch_size=16, progress=False)
    images = torch.cat([x for x, _ in make_loader(part, model, 64)])  # as extraction batches them, NCHW
    with torch.inference_mode():
        reference = model.branch_features(images)
    for got, expected in zip(features, reference):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine, digits_split, train_and_save):
    return train_and_save(engine, CONFIG, digits_split[0], tmp_path_factory.mktemp("bench") / "run", epochs=5, lr=1e-2)


def test_bench_measures_each_runtime_with_accuracy(run_dir, digits_split, tmp_path, capsys):
    _, test = digits_split
    data = tmp_path / "test.npz"
    np.savez(data, x=test.images.permute(0, 2, 3, 1).numpy(), y=test.targets, classes=np.asarray(test.classes))
    code = main(
        [
            "bench",
            str(run_dir),
            "--runtime",
            "torch",
            "--runtime",
            "bf16",
            "--batch-size",
            "8",
            "--iterations",
            "3",
            "--threads",
            "1",
            "--data",
            str(data),
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["runtime"] for r in rows] == ["torch", "bf16"]
    for row in rows:
        assert row["images_per_second"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] and row["peak_rss_mb"] > 50
        assert 0.5 < row["accuracy"] <= 1  # the trained model on held-out digits, not chance (0.1)
    assert abs(rows[0]["accuracy"] - rows[1]["accuracy"]) <= 0.02


def test_bench_table_and_unknown_runtime(run_dir, capsys):
    assert main(["bench", str(run_dir), "--runtime", "torch", "--batch-size", "4", "--iterations", "2"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["runtime", "images/s", "p50", "ms", "p95", "ms", "peak", "MB", "accuracy"]
    assert table.splitlines()[1].startswith("torch") and "(1.00x)" in table
    assert main(["bench", str(run_dir), "--runtime", "turbo"]) != 0
    assert "unknown runtime ['turbo']; valid: torch, channels_last" in capsys.readouterr().err


@pytest.mark.parametrize("runtime, atol", [("bf16", 0.05), ("onnx", 1e-4)])
def test_extraction_runtimes_give_the_features_of_torch_under_their_own_cache_key(
    model, digits_split, runtime, atol, tmp_path
):
    if runtime == "onnx" and any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip("onnx extraction needs fusion-engine[onnx]")
    part = digits_split[0].subset(list(range(48)))
    reference = FeatureCache(tmp_path, runtime="torch").features(model, part, batch_size=16, progress=False)
    cache = FeatureCache(tmp_path, runtime=runtime)
    features = cache.features(model, part, batch_size=16, progress=False)
    assert cache.stats["hits"] == 0 and cache.stats["extracted"] == 2  # not torch's entries
    for got, expected in zip(features, reference):
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, atol=atol * max(scale, 1.0), rtol=0)
    again = FeatureCache(tmp_path, runtime=runtime)
    again.features(model, part, batch_size=16, progress=False)
    assert again.stats["hits"] == 2 and len(list(tmp_path.glob("*.npy"))) == 4
    if runtime == "onnx":  # another dataset through the same cache object: the exported graphs are reused
        cache.features(model, digits_split[1].subset(list(range(20))), batch_size=16, progress=False)
        assert cache.stats["extracted"] == 4 and len(cache.sessions) == 2  # one per branch
        assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


def test_unknown_extraction_runtime_lists_the_valid_ones(model, digits_split):
    with pytest.raises(ConfigError, match="unknown extraction runtime 'tpu'; valid: auto, torch, bf16, onnx, int8"):
        FeatureCache(enabled=False, runtime="tpu")
    with pytest.raises(ConfigError, match="'onnx' runs on the CPU, not on cuda"):
        FeatureCache(enabled=False, runtime="onnx").features(
            model, digits_split[1].subset([0, 1]), device="cuda", progress=False
        )


def test_fit_with_bf16_extraction_trains_a_working_model(engine, digits_split, tmp_path):
    train, test = digits_split
    torch.manual_seed(0)
    model = engine.build(CONFIG, class_names=train.classes)
    history = model.fit(
        train,
        extract_runtime="bf16",
        epochs=15,
        lr=1e-2,
        baselines=False,
        cache_dir=tmp_path,
        progress=False,
        log=lambda *a, **k: None,
    )
    assert history["config"]["extract_runtime"] == "bf16"
    assert model.evaluate(test, progress=False, cache=FeatureCache(tmp_path))["accuracy"] > 0.5


def _bench(run, *options) -> int:
    return main(["bench", str(run), "--runtime", "torch", "--batch-size", "4", "--iterations", "1", *options])


def test_bench_on_a_tampered_run_exits_2_with_one_line(run_dir, tmp_path, capsys):
    tampered = tmp_path / "run"
    shutil.copytree(run_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (tampered / "model.safetensors").write_bytes(bytes(data))
    assert _bench(tampered, "--runtime", "bf16") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(
        r"error: every runtime failed \(torch, bf16\): ArtifactError: [^\n]*model\.safetensors[^\n]*\n", captured.err
    ), captured.err


def test_bench_checks_the_signature_in_each_measuring_process(run_dir, engine, tmp_path, capsys):
    from fusion_engine import load
    from fusion_engine.artifacts.signing import generate_keypair
    from fusion_engine.artifacts.store import save

    private, public = generate_keypair(tmp_path / "keys" / "signing.pem")
    assert _bench(run_dir, "--public-key", str(public)) == 2  # the unsigned run is refused, not measured
    captured = capsys.readouterr()
    assert captured.out == "" and re.fullmatch(
        r"error: every runtime failed \(torch\): ArtifactError: artifact is not signed: [^\n]*\n", captured.err
    ), captured.err
    save(load(run_dir, engine=engine), tmp_path / "signed", signing_key=private)
    assert _bench(tmp_path / "signed", "--public-key", str(public), "--json") == 0
    assert "images_per_second" in json.loads(capsys.readouterr().out)[0]


def test_bench_exits_0_when_one_runtime_still_works(run_dir, capsys, monkeypatch):
    import fusion_engine.cli.bench as bench

    rows = [{"runtime": "torch", "error": "RuntimeError: no"}, {"runtime": "bf16", "images_per_second": 1.0}]
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: rows)
    assert _bench(run_dir, "--json") == 0 and json.loads(capsys.readouterr().out) == rows
    rows[1] = {"runtime": "bf16", "error": "ConfigError: \x1b[31mred\nsecond line"}
    assert _bench(run_dir) == 2  # two different errors: both, first lines only, escaped, in one line
    assert capsys.readouterr().err == (
        "error: every runtime failed (torch): RuntimeError: no; ConfigError: \\x1b[31mred\n"
    )


def test_bench_table_flags_a_runtime_that_moves_top1_more_than_half_a_point():
    from fusion_engine.runtime.bench import format_results

    row = {"p50_ms": 10.0, "p95_ms": 12.0, "peak_rss_mb": 500}
    table = format_results(
        [
            {"runtime": "torch", "images_per_second": 10.0, "accuracy": 0.764, **row},
            {"runtime": "channels_last", "images_per_second": 18.0, "accuracy": 0.762, **row},
            {"runtime": "bf16", "images_per_second": 34.0, "accuracy": 0.758, **row},
            {"runtime": "onnx", "error": "ExportError: no"},
        ]
    )
    lines = table.splitlines()
    assert lines[2].endswith("0.7620 (1.80x) -0.20 pt") and lines[3].endswith("0.7580 (3.40x) -0.60 pt")
    assert lines[4] == "onnx                failed: ExportError: no"
    assert lines[5:] == [
        "note: bf16 changes top-1 by -0.60 points vs torch (more than 0.5); check it on your own held-out data"
    ]


def test_runtime_names_are_one_vocabulary():
    """ "torch" is the name everywhere (extraction, predict, bench); bench's older "eager" still works."""
    assert runtime_name("eager") == "torch" and runtime_name("onnx") == "onnx"
    assert RUNTIMES[0] == "torch"
    with pytest.raises(ConfigError, match="unknown runtime 'turbo'; valid: torch, channels_last"):
        runtime_name("turbo")
