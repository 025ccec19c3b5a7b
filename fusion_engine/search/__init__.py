"""Automatic selection of backbones and fusion by cross-validation on cached features.

Modules (lower first; each imports only those before it):

- :mod:`~fusion_engine.search.config`: :class:`SearchConfig`, the search's options;
- :mod:`~fusion_engine.search.candidates`: candidate backbones and fusion grids, feature extraction;
- :mod:`~fusion_engine.search.selection`: the cross-validated greedy selection (:class:`Searcher`),
  the time budget, the rank-agreement check;
- :mod:`~fusion_engine.search.result`: :class:`SearchResult` (leaderboard, winner, held-out report,
  training and saving the winner);
- :mod:`~fusion_engine.search.run`: the :func:`search` entry point.
"""
