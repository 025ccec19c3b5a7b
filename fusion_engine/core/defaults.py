"""The default fused model of ``fusion-engine train`` when no config is given."""

from __future__ import annotations

from fusion_engine.core.weights_index import all_entries

HUB_BACKBONES = ["mobilenetv3_large_100", "efficientnet_b0", "resnet18"]
MAX_DEFAULT_BRANCHES = 3


def default_config(fusion: str = "concat", engine=None) -> tuple[dict, str]:
    """(config, note): indexed local weights when a weights folder is set, else timm's backbones, pretrained
    from the hub or its local cache when the weights can be had (``Engine.build`` warns, naming them, about
    those that fall back to random weights). When the handcrafted plugin is installed, a HOG +
    colour-histogram branch joins the CNNs (classic and deep features fused)."""
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
    backbones = [{"name": "timm", "model": m} for m in HUB_BACKBONES]  # pretrained by default when weights can be had
    return (
        {"backbones": backbones, "fusion": fusion},
        f"timm backbones {', '.join(HUB_BACKBONES)}, pretrained from the hub or its local cache when the weights "
        "can be had (a warning names any that cannot)",
    )
