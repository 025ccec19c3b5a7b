"""Automatic selection (``fusion-engine train --search``): CV on cached features, greedy subsets, every fusion.

Backbones here are parameter-free "pixel" backbones from a plugin registered in the test (instant
features) and, for the CLI round trip, tiny timm models saved as local weights with an index.json.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

import fusion_engine
from fusion_engine import Engine, hookimpl
from fusion_engine.core.data import ArrayImageDataset, load_dataset, stratified_split
from fusion_engine.errors import ConfigError
from fusion_engine.search.candidates import DEFAULT_GRID, load_candidates, setting_label
from fusion_engine.search.config import SearchConfig
from fusion_engine.search.result import SearchResult, side_paths
from fusion_engine.search.run import search
from fusion_engine.search.selection import CV_STEPS, Searcher, rank_agreement


class Pixels(nn.Module):
    """Grey pixels at ``size`` x ``size`` as features: the whole image, or only its left half."""

    def __init__(self, size: int, region: str):
        super().__init__()
        self.region = region
        self.data_config = {
            "input_size": (3, size, size),
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "interpolation": "bilinear",
        }

    def forward(self, x):
        grey = x.mean(dim=1)
        h, w = grey.shape[1] // 2, grey.shape[2] // 2
        if self.region == "left":
            grey = grey[:, :, :w]
        elif self.region == "noise":  # as many features, none of them about the image
            grey = torch.randn_like(grey)
        elif self.region != "all":  # a quarter: "top-left", "bottom-right"...
            rows, cols = self.region.split("-")
            grey = grey[:, :h] if rows == "top" else grey[:, h:]
            grey = grey[:, :, :w] if cols == "left" else grey[:, :, w:]
        return grey.flatten(1)


QUARTERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def pixels(size: int = 8, region: str = "all"):
    if region not in ("all", "left", "noise", *QUARTERS):
        raise ValueError(f"region must be one of all, left, noise, {', '.join(QUARTERS)}")
    return Pixels(size, region)


class MeanOfLinear(nn.Module):
    """A plugin fusion: one linear head per branch, logits averaged."""

    def __init__(self, in_dims, num_classes, scale: float = 1.0):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in in_dims)
        self.scale = scale

    def forward(self, features):
        return self.scale * torch.stack([h(f) for h, f in zip(self.heads, features)]).mean(0)


class Broken(nn.Module):
    def __init__(self, in_dims, num_classes):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, features):
        raise RuntimeError("this fusion always fails")


class SearchTestPlugin:
    __version__ = "0.0.1"

    @hookimpl
    def register_backbones(self, register):
        register("pixels", pixels, description="Grey pixels (test backbone)")

    @hookimpl
    def register_fusions(self, register):
        register("mean_of_linear", MeanOfLinear, description="Average of per-branch linear heads (test plugin)")
        register("broken_fusion", Broken, description="Always fails (test plugin)")


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    small, _ = stratified_split(data, len(data) - 600, 0)
    return stratified_split(small, 150, 0)  # 450 train, 150 test


@pytest.fixture
def engine(register_plugin):
    register_plugin(SearchTestPlugin())
    return Engine.from_plugins()


FULL = {"name": "pixels", "size": 8, "label": "full"}
LEFT = {"name": "pixels", "size": 8, "region": "left", "label": "left"}
QUICK = {"stacking": [{}]}


class Watched(ArrayImageDataset):
    """A dataset that fails the test if its images or labels are read before ``allowed["read"]`` is set."""

    def __init__(self, dataset, allowed):
        super().__init__(dataset.images, dataset.targets, dataset.classes, "poisoned test")
        object.__setattr__(self, "_allowed", allowed)

    def __getattribute__(self, name):
        if name in ("images", "targets", "digest") and not object.__getattribute__(self, "_allowed")["read"]:
            raise AssertionError(f"the test split was read ({name}) before the choice was made")
        return object.__getattribute__(self, name)


def test_selection_never_reads_the_test_split(engine, digits, tmp_path, monkeypatch):
    train, test = digits
    # Poison: noise over the right half of every test image. The whole-image backbone wins on the
    # (clean) training data; on this test set the left-half backbone wins, so a leak would flip the choice.
    rng = np.random.default_rng(0)
    images = test.images.clone()
    images[..., 4:] = torch.from_numpy(rng.integers(0, 256, size=tuple(images[..., 4:].shape), dtype=np.uint8))
    allowed = {"read": False}
    poisoned = Watched(ArrayImageDataset(images, test.targets, test.classes), allowed)
    original_run = Searcher.run

    def run_then_allow(self, *args, **kwargs):
        outcome = original_run(self, *args, **kwargs)
        allowed["read"] = True  # the choice is made: from here on the test data may be read
        return outcome

    monkeypatch.setattr(Searcher, "run", run_then_allow)
    options = dict(
        engine=engine,
        fusions=QUICK,
        screen="stacking",
        cache_dir=tmp_path / "cache",
        folds=3,
        max_branches=1,
        baseline=False,
        log=lambda *a: None,
    )
    clean = search(train, [FULL, LEFT], **options)
    allowed["read"] = False
    leaked = search(train, [FULL, LEFT], test=poisoned, **options)

    assert clean.winner["backbones"] == ["full"] == leaked.winner["backbones"]  # the whole image, both times
    # the second search reads the first one's features; extraction speed is then timed on the extraction path
    assert all(c.cached and c.images_per_second > 0 for c in leaked.candidates)
    assert not any(c.cached for c in clean.candidates)
    assert clean.winner_config == leaked.winner_config
    cv = lambda result: {r["candidate"]: r["cv_folds"] for r in result.rows}  # noqa: E731
    assert cv(clean) == cv(leaked)
    # the poison works: on the test split another candidate would have won
    held = {r["candidate"]: r["held_out"] for r in leaked.rows if r["held_out"] is not None}
    left_best = max(v for k, v in held.items() if "[left]" in k)
    assert left_best > leaked.winner["held_out"] + 0.1, held
    assert leaked.ranking is not None and leaked.ranking["agree"] is False  # and the report says so
    # the result's shape is its declared fields: nothing is attached to it from outside
    assert set(vars(leaked)) == {f.name for f in dataclasses.fields(SearchResult)}
    assert leaked.to_dict()["cv_training"]["folds"] == 3


def test_plugin_fusion_is_a_candidate_and_a_failing_one_is_reported(engine, digits, tmp_path):
    train, _ = digits
    result = search(
        train,
        [FULL],
        engine=engine,
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=2,
        epochs=2,
        max_branches=1,
        baseline=False,
    )
    tried = result.fusions["tried"]
    assert "mean_of_linear" in tried and "broken_fusion" in tried
    registered = engine.registry.names("fusion")
    assert {name for name in registered} <= {t.split("(")[0] for t in tried}  # every registered fusion
    assert {"concat", "concat(hidden=512)", "stacking", "stacking(C=0.1)"} <= set(tried)  # with its grid
    rows = {r["fusion"]["name"]: r for r in result.leaderboard if r["fusion"]}
    assert rows["mean_of_linear"]["cv_mean"] is not None and rows["mean_of_linear"]["rank"] >= 1
    assert "always fails" in rows["broken_fusion"]["error"] and rows["broken_fusion"]["rank"] is None
    assert result.winner["fusion"]["name"] != "broken_fusion"


def test_time_budget_is_respected(engine, digits, tmp_path):
    train, _ = digits
    candidates = [{"name": "pixels", "size": s, "label": f"px{s}"} for s in (8, 10, 12, 14, 16, 20)]
    search(
        train,
        candidates,
        engine=engine,
        fusions=["concat"],
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=2,
        epochs=1,
        max_branches=1,
        baseline=False,
    )  # fills the cache: extraction is outside the budget
    budget_minutes = 0.05  # 3 s, for some 40 rows of 3 folds each
    result = search(
        train,
        candidates,
        engine=engine,
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=3,
        epochs=5,
        patience=5,
        time_budget=budget_minutes,
        max_branches=3,
        baseline=False,
    )
    timing = result.timing
    assert timing["budget_exhausted"] and "time budget" in result.stopped
    assert timing["evaluations"] >= 2  # it did use the budget
    # a fold starts only when its estimated end is within the budget; the estimate may miss by one fold
    assert timing["search_seconds"] <= budget_minutes * 60 + timing["longest_fold_seconds"] + 0.5, timing
    assert timing["cached_backbones"] == len(candidates)
    # every single backbone is a row, scored or marked as cut by the budget
    singles = [r for r in result.leaderboard if r["kind"] == "single" and r["fusion"] == {"name": "concat"}]
    assert len(singles) == len(candidates)
    assert all(r["cv_mean"] is not None or "time budget" in r["error"] for r in singles)
    assert result.winner["cv_mean"] is not None


def test_greedy_selection_stops_within_fold_noise(engine, digits, tmp_path):
    train, _ = digits
    result = search(
        train,
        [FULL, FULL | {"size": 9, "label": "full9"}, LEFT],
        engine=engine,
        fusions={"stacking": [{}]},
        screen="stacking",
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=3,
        max_branches=3,
    )
    kinds = [r["kind"] for r in result.leaderboard]
    assert kinds.count("baseline") == 1 and kinds.count("single") == 3
    steps = result.steps
    assert steps[0]["accepted"] and len(steps) == 2
    # the pair's gain (a near tie either way) is within the noise of the paired fold differences: the single wins
    assert abs(steps[1]["gain"]) <= steps[1]["noise"] and not steps[1]["accepted"]
    assert "fold noise" in result.stopped
    assert len(result.winner["backbones"]) == 1
    board = result.leaderboard
    assert board[0]["kind"] == "baseline" and "fused" in kinds and sum(bool(r.get("winner")) for r in board) == 1
    for row in board:
        assert set(row) >= {
            "candidate",
            "cv_mean",
            "cv_std",
            "held_out",
            "feature_width",
            "images_per_second",
            "parameters",
        }
    assert "| rank | candidate |" in result.table()
    # prefer_fewer=False: the best CV row of all, whatever its size
    best = search(
        train,
        [FULL, FULL | {"size": 9, "label": "full9"}, LEFT],
        engine=engine,
        fusions={"stacking": [{}]},
        screen="stacking",
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=3,
        max_branches=3,
        baseline=False,
        prefer_fewer=False,
    )
    assert best.winner["candidate"] == board[1]["candidate"]


def test_informative_branch_chosen_and_noise_branch_left_out(engine, digits, tmp_path):
    train, _ = digits
    noise = {"name": "pixels", "size": 8, "region": "noise", "label": "noise"}
    result = search(
        train,
        [noise, FULL],
        engine=engine,
        fusions=["concat", "stacking"],
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=3,
        max_branches=2,
        baseline=False,
    )
    singles = {r["backbones"][0]: r["cv_mean"] for r in result.rows if r["kind"] == "single"}
    assert singles["full"] > 0.8 and singles["noise"] < 0.3, singles  # ten classes: chance is 0.1
    assert result.winner["backbones"] == ["full"]
    assert [s["accepted"] for s in result.steps] == [True, False]  # the pair was scored and gained nothing
    assert "fold noise" in result.stopped
    # by default the CV heads train for about CV_STEPS optimizer steps (before early stopping)
    cv = result.to_dict()["cv_training"]
    fit_rows = int(len(train) * (cv["folds"] - 1) / cv["folds"] * (1 - result.train_config.val_fraction))
    steps = -(-fit_rows // min(result.train_config.head_batch_size, max(16, fit_rows // 20)))
    assert cv["epochs"] == max(10, -(-CV_STEPS // steps)) and cv["epochs"] * steps >= CV_STEPS


def test_every_step_up_to_triples_is_scored_with_every_fusion(engine, digits, tmp_path):
    """Four backbones that each see a quarter of the image: each addition helps, so the greedy selection
    scores singles, pairs and triples, and every fusion setting on each step's subset."""
    train, _ = digits
    quarters = [{"name": "pixels", "size": 8, "region": q, "label": q} for q in QUARTERS]
    result = search(
        train,
        quarters,
        engine=engine,
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=3,
        epochs=3,
        max_branches=3,
        baseline=False,
    )
    fusions = result.fusions["tried"]
    assert {"concat", "concat(hidden=512)", "attention", "gated", "vote", "stacking", "stacking(C=0.1)"} <= set(fusions)
    assert [s["size"] for s in result.steps] == [1, 2, 3] and all(s["accepted"] for s in result.steps)
    assert result.stopped == "max_branches reached"
    rows = [r for r in result.rows if r["kind"] != "baseline"]
    by_size = {k: [r for r in rows if len(r["subset"]) == k] for k in (1, 2, 3)}
    assert len({tuple(r["subset"]) for r in by_size[1]}) == 4  # every single
    assert len({tuple(r["subset"]) for r in by_size[2]}) == 3  # the best single with each other one
    assert len({tuple(r["subset"]) for r in by_size[3]}) == 2  # the best pair with each other one
    for step in result.steps:  # every fusion setting on the subset the step chose, scored or failed with a reason
        chosen = [r for r in rows if [result.candidates[i].label for i in r["subset"]] == step["subset"]]
        assert {setting_label(r["fusion"]) for r in chosen} >= set(fusions)
        assert all(r["cv_mean"] is not None or r.get("error") for r in chosen)
        assert all(r["cv_mean"] is not None for r in chosen if r["fusion"]["name"] != "broken_fusion")
    assert len(result.winner["backbones"]) == 3


def test_saved_config_reproduces_the_winner(tmp_path, digits, monkeypatch, capsys):
    """`train --search` on an index of local weights; rerunning its RUN_DIR.config.json gives the same model."""
    import timm
    from safetensors.torch import save_file

    from fusion_engine import cli

    weights = tmp_path / "weights"
    weights.mkdir()
    index = {}
    for seed, model in enumerate(["test_resnet", "test_efficientnet"]):
        torch.manual_seed(seed)
        net = timm.create_model(model, num_classes=0)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights / f"{model}.safetensors")
        index[f"{model}.seed{seed}"] = {
            "architecture": f"timm:{model}",
            "input_size": [3, 32, 32],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "file": f"{model}.safetensors",
        }
    index["not_timm.v1"] = {"architecture": "something else", "file": "missing.safetensors"}
    (weights / "index.json").write_text(json.dumps(index))
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fusion-engine-weights")  # its weights would be candidates
    assert [c["weights"] for c in load_candidates(None)[0]] == list(index)
    assert load_candidates(None, [{"name": "hog"}])[0][-1] == {"name": "hog"}  # extras follow the index
    train, test = digits
    for name, part in (("train", train), ("test", test)):
        np.savez(tmp_path / f"{name}.npz", x=part.images.numpy(), y=part.targets, classes=np.array(part.classes))
    (tmp_path / "cands.json").write_text(json.dumps({"fusions": {"concat": [{}], "stacking": [{}, {"C": 0.1}]}}))
    common = [
        "--data",
        str(tmp_path / "train.npz"),
        "--data-test",
        str(tmp_path / "test.npz"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--epochs",
        "5",
        "-q",
        "--json",
    ]
    run = tmp_path / "searched"
    assert (
        cli.main(
            [
                "train",
                "--search",
                "--candidates",
                str(tmp_path / "cands.json"),
                "--out",
                str(run),
                "--folds",
                "2",
                "--max-branches",
                "2",
                "--search-epochs",
                "5",
                *common,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    config_file, board_file = side_paths(run)
    assert out["config"] == str(config_file) and config_file.is_file() and board_file.is_file()
    board = out["search"]
    assert [s["candidate"] for s in board["not_buildable"]] == ["timm:not_timm.v1"]
    if "handcrafted" in Engine.from_plugins().registry.names("backbone"):  # its plugin joins the default candidates
        assert any(r["backbones"] == ["handcrafted"] for r in board["leaderboard"])
    assert any(r["winner"] for r in board["leaderboard"])
    assert board["winner_config"] == json.loads(config_file.read_text())
    assert all(r["held_out"] is not None for r in board["leaderboard"] if r["cv_mean"] is not None)

    again = tmp_path / "rerun"
    assert cli.main(["train", "--config", str(config_file), "--out", str(again), *common]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["accuracy"] == out["accuracy"]
    first, second = fusion_engine.load(run), fusion_engine.load(again)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.history["search"]["winner"] == board["winner"]  # the leaderboard is in the manifest


def test_candidates_file_forms(tmp_path, monkeypatch):
    (tmp_path / "list.json").write_text(json.dumps(["timm:resnet18", {"name": "timm", "model": "resnet34"}]))
    specs, fusions = load_candidates(tmp_path / "list.json")
    assert len(specs) == 2 and fusions is None
    specs, fusions = load_candidates({"backbones": ["hog"], "fusions": ["concat", {"name": "gated", "dim": 64}]})
    assert specs == ["hog"] and fusions == {"concat": DEFAULT_GRID["concat"], "gated": [{"dim": 64}]}
    with pytest.raises(Exception, match="unknown key"):
        load_candidates({"backbone": []})
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fusion-engine-weights")  # no weights package either
    with pytest.raises(Exception, match="no candidate backbones"):
        load_candidates(None)  # no weights folder configured
    with pytest.raises(pydantic.ValidationError):
        SearchConfig(folds=1)


def test_bad_search_options_are_config_errors():
    # checked before anything is loaded or built: no data, no engine needed
    with pytest.raises(ConfigError, match=r"search options: option 'folds': .*greater than or equal to 2 \(got 1\)"):
        search(None, [FULL], folds=1)
    with pytest.raises(ConfigError, match=r"unknown option 'fold' \(did you mean 'folds'\?\)"):
        search(None, [FULL], fold=3)


def test_rank_agreement_reports_disagreement():
    rows = [
        {"candidate": c, "cv_mean": cv, "held_out": h}
        for c, cv, h in [("a", 0.9, 0.80), ("b", 0.89, 0.90), ("c", 0.5, 0.5)]
    ]
    verdict = rank_agreement(rows, n_test=2000)
    assert verdict["agree"] is False and "a (" in verdict["discordant"][0] and "NOT" in verdict["statement"]
    rows[1]["held_out"] = 0.805  # swapped, but within held-out noise
    assert rank_agreement(rows, n_test=2000)["agree"] is True


def summary_of(rows: list[dict], winner: int, n_test: int | None = None) -> str:
    """SearchResult.summary() of hand-made leaderboard rows (only what the summary reads)."""
    defaults = {"cv_std": 0.01, "held_out": None, "feature_width": 1, "images_per_second": None, "parameters": 1}
    rows = [{**defaults, **row, "cv_folds": [row["cv_mean"] + d for d in (-0.01, 0.0, 0.01)]} for row in rows]
    result = SearchResult(
        rows=rows,
        winner=rows[winner],
        steps=[],
        stopped="every candidate used",
        skipped=[],
        fusions={},
        timing={"extract_seconds": 1.0, "search_seconds": 2.0},
        class_names=["a", "b"],
        candidates=[],
        parts=[],
        searcher=None,
        engine=None,
        config=SearchConfig(),
        train_config=None,
        cache=None,
        device=torch.device("cpu"),
    )
    if n_test is not None:
        result._test = [None] * n_test
    return result.summary()


BASELINE = "handcrafted: HOG + colour histogram + logistic regression"


def test_summary_says_when_the_handcrafted_baseline_beats_the_fused_winner():
    rows = [
        {"candidate": "concat [a + b]", "kind": "fused", "cv_mean": 0.80, "held_out": 0.78},
        {"candidate": "concat [a]", "kind": "single", "cv_mean": 0.75, "held_out": 0.74},
        {"candidate": BASELINE, "kind": "baseline", "cv_mean": 0.90, "held_out": 0.91},
    ]
    text = summary_of(rows, winner=0, n_test=1000)
    assert f"NOTE: the handcrafted baseline beats the fused winner on CV: {BASELINE} 0.9000 against 0.8000" in text
    assert "the handcrafted baseline beats the fused winner on held-out: " in text and "13.00 points more" in text
    assert "a single backbone beats" not in text and "fusion won" not in text


def test_summary_says_when_a_single_backbone_beats_the_fused_winner_on_held_out_data():
    rows = [
        {"candidate": "concat [a + b]", "kind": "fused", "cv_mean": 0.80, "held_out": 0.70},
        {"candidate": "concat [a]", "kind": "single", "cv_mean": 0.79, "held_out": 0.705},
        {"candidate": BASELINE, "kind": "baseline", "cv_mean": 0.50, "held_out": 0.50},
    ]
    text = summary_of(rows, winner=0, n_test=200)
    line = next(line for line in text.splitlines() if "a single backbone beats the fused winner on held-out" in line)
    assert "concat [a] 0.7050 against 0.7000" in line and "within the held-out noise" in line
    assert "on CV" not in text


def test_summary_says_when_fusion_won_and_when_a_single_backbone_won():
    rows = [
        {"candidate": "concat [a + b]", "kind": "fused", "cv_mean": 0.90, "held_out": 0.88},
        {"candidate": "concat [a]", "kind": "single", "cv_mean": 0.80, "held_out": 0.79},
        {"candidate": BASELINE, "kind": "baseline", "cv_mean": 0.70, "held_out": 0.70},
    ]
    text = summary_of(rows, winner=0, n_test=500)
    assert (
        "fusion won: the fused winner beats the handcrafted baseline and every single backbone on CV and held-out data"
        in text
    )
    assert "NOTE" not in text
    text = summary_of(rows, winner=1, n_test=500)  # a single backbone chosen (say, more backbones gained too little)
    assert "fusion did not win: the winner is a single backbone; the best fused row, concat [a + b], " in text
    assert "fusion won" not in text


def test_a_row_far_behind_the_leader_stops_racing_and_cannot_win(engine, digits, tmp_path):
    train, _ = digits
    noise = {"name": "pixels", "size": 8, "region": "noise", "label": "noise"}
    options = dict(engine=engine, fusions=["concat"], log=lambda *a: None, folds=5, max_branches=1, baseline=False)
    raced = search(train, [FULL, noise], cache_dir=tmp_path / "cache", **options)
    rows = {r["backbones"][0]: r for r in raced.rows}
    assert len(rows["full"]["cv_folds"]) == 5 and "stopped_early" not in rows["full"]
    assert len(rows["noise"]["cv_folds"]) == 2  # far behind after two folds: no third
    assert (
        rows["noise"]["stopped_early"].startswith("stopped after 2 of 5 folds:")
        and "behind concat [full]" in rows["noise"]["stopped_early"]
    )
    assert raced.winner["backbones"] == ["full"]
    assert [r["backbones"] for r in raced.leaderboard][-1] == ["noise"]  # after every fully scored row
    assert "(2 of 5 folds: stopped early)" in raced.table()
    every = search(train, [FULL, noise], cache_dir=tmp_path / "cache", race_margin=0, **options)
    assert all(len(r["cv_folds"]) == 5 and "stopped_early" not in r for r in every.rows)
    assert every.rows[0]["cv_folds"] == raced.rows[0]["cv_folds"]  # the same folds: racing changes no score
    assert every.rows[1]["cv_folds"][:2] == rows["noise"]["cv_folds"]


def test_a_row_within_the_race_margin_runs_every_fold(engine, digits, tmp_path):
    train, _ = digits
    result = search(
        train,
        [FULL, FULL | {"size": 9, "label": "full9"}],
        engine=engine,
        fusions=["concat"],
        cache_dir=tmp_path / "cache",
        log=lambda *a: None,
        folds=5,
        max_branches=1,
        baseline=False,
        race_margin=0.5,
    )
    assert all(len(r["cv_folds"]) == 5 and "stopped_early" not in r for r in result.rows)


class FittedOnly(nn.Module):
    """A fitted fusion whose constructor cannot run here: is_fitted must read the class, not build it."""

    requires_fit = True

    def __init__(self, in_dims, num_classes):
        raise AssertionError("built to ask whether it is fitted")


def wide_only(in_dims, num_classes):
    """A function factory that refuses small inputs, as a plugin's may."""
    if min(in_dims) < 8:
        raise ValueError("needs at least 8 features per branch")
    return MeanOfLinear(in_dims, num_classes)


def fitted_by_function(in_dims, num_classes):
    module = MeanOfLinear(in_dims, num_classes)
    module.requires_fit = True
    return module


class FittedQuestionPlugin:
    @hookimpl
    def register_fusions(self, register):
        register("fitted_only", FittedOnly, description="fitted (test plugin)")
        register("wide_only", wide_only, description="refuses small inputs (test plugin)")
        register("fitted_by_function", fitted_by_function, description="fitted, from a function (test plugin)")


def test_is_fitted_asks_the_class_and_survives_a_factory_that_refuses_tiny_inputs(register_plugin):
    from fusion_engine.search.run import fusion_has

    register_plugin(FittedQuestionPlugin())
    engine = Engine.from_plugins()

    def is_fitted(engine, fusion):
        return fusion_has(engine, fusion, "requires_fit")

    assert is_fitted(engine, {"name": "stacking"}) and not is_fitted(engine, {"name": "concat", "hidden": 16})
    assert is_fitted(engine, {"name": "fitted_only"})  # from the class: never built
    assert not is_fitted(engine, {"name": "wide_only"})  # cannot be built tiny: treated as trained by gradient
    assert is_fitted(engine, {"name": "fitted_by_function"})


@pytest.mark.parametrize(
    "screen, training, fix",
    [
        ("stacking", {"train_blocks": 1}, r"fitted, not trained by gradient.*screen with concat"),
        ("concat", {"train_blocks": 1, "independent_branches": True}, r"one head over all branches.*screen with vote"),
    ],
)
def test_a_screen_the_winners_training_cannot_use_is_refused_with_the_fix(engine, digits, screen, training, fix):
    """A screening row may win, so the screen must train as the winner will (top blocks, independent branches)."""
    from fusion_engine.training.config import train_config

    with pytest.raises(ConfigError, match=rf"screen fusion {screen}: {fix}"):
        search(digits[0], [FULL], engine=engine, screen=screen, train_config=train_config(**training), baseline=False)
