"""The default fused model of ``fusion-engine train`` when no config is given."""

from __future__ import annotations

import warnings

from fusion_engine.core.weights_index import ENV_VAR, all_entries, timm_model
from fusion_engine.errors import RandomInitWarning

HUB_BACKBONES = ["mobilenetv3_large_100", "efficientnet_b0", "resnet18"]
WEIGHTS_HINT = "for pretrained weights offline: pip install ./plugins/fusion-engine-weights (fusion-engine-weights)"
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
        f"can be had ({WEIGHTS_HINT})",
    )


def build_default(engine, config: dict, class_names, log) -> object:
    """``engine.build(config)`` for the default config, minus the branches that could only be randomly
    initialised, when any other branch is left (random CNN features lose to HOG and would fuse noise);
    ``log`` gets one line naming them and what to install. With no other branch they stay, and the
    build's RandomInitWarning says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomInitWarning)
        model = engine.build(config, class_names=class_names)
    random = [i for i, b in enumerate(model.branches) if getattr(b.backbone, "random_init_reason", None)]
    if random and len(random) < len(model.branches):
        names = ", ".join(model.branches[i].name for i in random)
        log(f"no pretrained weights for {names}: those branches are left out ({WEIGHTS_HINT})")
        kept = {**config, "backbones": [b for i, b in enumerate(config["backbones"]) if i not in random]}
        return engine.build(kept, class_names=class_names)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model
