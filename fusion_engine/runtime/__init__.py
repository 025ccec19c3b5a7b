"""Running models fast: inference runtimes, ONNX export, prediction, bench."""
