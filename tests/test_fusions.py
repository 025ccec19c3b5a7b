"""The built-in fusions on synthetic features: attention and gated start as concat, vote returns
log-probabilities, stacking keeps its meta-classifier only when it beats the average of its branches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_engine.core.probes import LinearProbe

DIMS = [12, 8, 5]
K = 4


def factory(name):
    from fusion_engine import Engine

    return Engine.from_plugins().registry.get("fusion", name).factory


def features(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) * 3 + 1 for d in DIMS]


@pytest.mark.parametrize("name", ["attention", "gated"])
def test_reweighting_fusions_start_with_concats_logits(name):
    torch.manual_seed(0)
    concat = factory("concat")(DIMS, K).eval()
    torch.manual_seed(1)
    fusion = factory(name)(DIMS, K).eval()
    with torch.no_grad():  # concat's own random head and norms, as if trained
        for p in concat.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fusion.concat.load_state_dict(concat.state_dict())
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(fusion(x), concat(x))
    # and they can move away from concat: the scoring layer gets a gradient
    fusion.train()
    fusion(x).logsumexp(1).sum().backward()
    scorer = fusion.score if name == "attention" else fusion.gate[-1]
    assert scorer.weight.grad.abs().sum() > 0


def test_vote_is_a_weighted_geometric_mean_of_the_branch_heads():
    torch.manual_seed(0)
    vote = factory("vote")(DIMS, K, weights=[1.0, 1.0, 2.0]).eval()
    x = features()
    with torch.no_grad():
        out = vote(x)
        logs = [torch.log_softmax(h(f), 1) for h, f in zip(vote.heads, x)]
        by_hand = torch.log_softmax((logs[0] + logs[1] + 2 * logs[2]) / 4, 1)
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(len(out)))


def separable(n, seed, noise=1.0):
    """Features of one branch (N, 6): class centres plus noise, and the labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    centres = rng.normal(size=(K, 6)) * 2
    return (centres[y] + noise * rng.normal(size=(n, 6))).astype(np.float32), y


def test_stacking_keeps_the_meta_classifier_when_it_beats_the_average():
    # one informative branch and two of pure noise, each base classifier barely regularised: the noise
    # branches are confidently wrong out of fold and drag the average down; the meta-classifier learns to
    # ignore them
    a, y = separable(120, 0, noise=2.5)
    rng = np.random.default_rng(5)
    noise = [rng.normal(size=(120, 20)).astype(np.float32) for _ in range(2)]
    stacking = factory("stacking")([6, 20, 20], K, seed=0, C=100.0).fit([a, *noise], y)
    assert bool(stacking.use_meta)
    assert max(stacking.scores["meta"].values()) > stacking.scores["average"] + 0.1


def test_stacking_falls_back_to_the_average_when_the_meta_classifier_does_worse():
    # three equally good, independent, noisy branches: the average is already the best combination, and a
    # meta-classifier fitted on 10 rows per class does worse than it in cross-validation, at every C tried
    branches, y = [], None
    for seed in range(3):
        x, y = separable(40, seed, noise=3.0)
        branches.append(x)
    stacking = factory("stacking")([6, 6, 6], K, seed=0).fit(branches, y)
    assert not bool(stacking.use_meta)
    assert max(stacking.scores["meta"].values()) <= stacking.scores["average"]
    x = [torch.from_numpy(f) for f in branches]
    with torch.no_grad():
        probs = [torch.softmax(probe(f), 1) for probe, f in zip(stacking.base, x)]
        by_hand = torch.log(sum(probs) / 3)
        torch.testing.assert_close(stacking.eval()(x), by_hand, atol=1e-5, rtol=1e-5)


def test_stacking_chooses_each_branchs_c_unless_given():
    a, y = separable(80, 0)
    chosen = factory("stacking")([6], K).fit([a], y)
    assert chosen.scores["C"][0] in (0.1, 1.0, 10.0)
    fixed = factory("stacking")([6], K, C=0.5, meta_C=2.0).fit([a], y)
    assert fixed.scores["C"] == [0.5] and list(fixed.scores["meta"]) == [2.0]
    assert isinstance(fixed.base[0], LinearProbe)
