"""Saved models and their security: store/load, the manifest, safe files, signing, encryption, atomic writes,
compression (pruning, quantisation)."""
