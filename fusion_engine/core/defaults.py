"""The default fused model of ``fusion-engine train`` when no config is given."""

from __future__ import annotations

from fusion_engine.core.weights_index import ENV_VAR, all_entries, timm_model

HUB_BACKBONES = ["mobilenetv3_large_100", "efficientnet_b0", "resnet18"]
MAX_DEFAULT_BRANCHES = 3


def default_config(fusion: str = "concat", engine=None) -> tuple[dict, str]:
    """(config, note): indexed weights when there are any (a weights folder the user set, then weights shipped
    by an installed package such as fusion-engine-weights; the note names them and where they come from), else
    timm's backbones, pretrained from the hub or its local cache when the weights can be had (``Engine.build``
    warns, naming them, about those that fall back to random weights). When the handcrafted plugin is
    installed, a HOG + colour-histogram branch joins the CNNs (classic and deep features fused)."""
    config, note = _cnn_config(fusion)
    if engine is not None and "handcrafted" in engine.registry.names("backbone"):
        config["backbones"].append({"name": "handcrafted"})
        note += "; plus a handcrafted (HOG + colour histogram) branch"
    return config, note


def _origin(entry: dict) -> str:
    return f"shipped by {entry['distribution']}" if entry.get("distribution") else f"--weights-dir / {ENV_VAR}"


def _cnn_config(fusion: str) -> tuple[dict, str]:
    entries = all_entries()
    local = [name for name, entry in entries.items() if timm_model(name, entry)][:MAX_DEFAULT_BRANCHES]
    if local:
        backbones = [{"name": "timm", "weights": name} for name in local]
        origins: dict[str, list[str]] = {}
        for name in local:
            origins.setdefault(_origin(entries[name]), []).append(name)
        named = "; ".join(f"{', '.join(names)} ({origin})" for origin, names in origins.items())
        return {"backbones": backbones, "fusion": fusion}, f"pretrained backbones from the weights index: {named}"
    backbones = [{"name": "timm", "model": m} for m in HUB_BACKBONES]  # pretrained by default when weights can be had
    return (
        {"backbones": backbones, "fusion": fusion},
        f"timm backbones {', '.join(HUB_BACKBONES)}, pretrained from the hub or its local cache when the weights "
        "can be had (a warning names any that cannot; for pretrained weights offline: "
        "pip install ./plugins/fusion-engine-weights)",
    )
