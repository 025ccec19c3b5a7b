"""The library front door: Engine (build, load) and FusedClassifier (fit, evaluate, save)."""
