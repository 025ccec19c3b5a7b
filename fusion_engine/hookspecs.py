"""Hook specifications: what a fusion-engine plugin may implement."""

import pluggy

PROJECT = "fusion_engine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backbones(register):
    """Offer backbones: call ``register(name, factory, description="")`` once per backbone.

    ``factory(**options)`` returns an ``nn.Module`` with ``feature_dim``, ``data_config``
    and ``forward(images) -> features`` (see docs/plugins.md).
    """


@hookspec
def register_extractors(register):
    """Offer feature extractors: ``register(name, factory, description="")``.

    ``factory(backbone, **options)`` returns an ``nn.Module`` turning the backbone's
    output into one vector per image.
    """


@hookspec
def register_fusions(register):
    """Offer fusion strategies: ``register(name, factory, description="")``.

    ``factory(in_dims, num_classes, **options)`` returns an ``nn.Module`` whose
    ``forward(list_of_features) -> logits``; a fitted fusion also has ``fit(features, y)``.
    """
