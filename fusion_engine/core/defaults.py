"""The default fused model of ``fusion-engine train`` when no config is given."""

from __future__ import annotations

from fusion_engine.core.hub import hub_reachable
from fusion_engine.core.weights_index import all_entries

HUB_BACKBONES = ["mobilenetv3_large_100", "efficientnet_b0", "resnet18"]
MAX_DEFAULT_BRANCHES = 3


def default_config(fusion: str = "concat", engine=None) -> tuple[dict, str]:
    """(config, note): indexed local weights when a weights folder is set, else hub weights when the
    hub answers, else random initialisation (the note says so plainly). When the handcrafted plugin
    is installed, a HOG + colour-histogram branch joins the CNNs (classic and deep features fused)."""
    config, note = _cnn_config(fusion)
    if engine is not None and "handcrafted" in engine.registry.names("backbone"):
        config["backbones"].append({"name": "handcrafted"})
        note += "; plus a handcrafted (HOG + colour histogram) branch"
    return config, note


def _cnn_config(fusion: str) -> tuple[dict, str]:
    local = [name for name, entry in all_entries().items() if str(entry.get("architecture", "")).startswith("timm:")][
        :MAX_DEFAULT_BRANCHES
    ]
    if local:
        backbones = [{"name": "timm", "weights": name} for name in local]
        return {
            "backbones": backbones,
            "fusion": fusion,
        }, f"pretrained backbones from the local weights index: {', '.join(local)}"
    if hub_reachable():
        backbones = [{"name": "timm", "model": m, "pretrained": True} for m in HUB_BACKBONES]
        return {
            "backbones": backbones,
            "fusion": fusion,
        }, f"pretrained backbones from the hub: {', '.join(HUB_BACKBONES)}"
    backbones = [{"name": "timm", "model": m} for m in HUB_BACKBONES]
    return (
        {"backbones": backbones, "fusion": fusion},
        "WARNING: no pretrained weights could be had (the hub is unreachable and no --weights-dir / "
        "FUSION_ENGINE_WEIGHTS_DIR was given), so the backbones are RANDOMLY INITIALISED; expect far lower "
        "accuracy than pretrained backbones give",
    )
