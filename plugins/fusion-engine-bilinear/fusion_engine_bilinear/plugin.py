"""Entry point (group ``fusion_engine``): registers the ``bilinear`` fusion."""

from fusion_engine.plugin_api import hookimpl

from .fusion import bilinear_fusion


@hookimpl
def register_fusions(register):
    register(
        "bilinear",
        bilinear_fusion,
        description="Low-rank (MFB) bilinear pooling across any number of branches",
    )
