"""Entry point (group ``fusion_engine``): registers the handcrafted-descriptor backbones."""

from fusion_engine.plugin_api import hookimpl

from .backbones import color_histogram_backbone, handcrafted_backbone, hog_backbone, lbp_backbone


@hookimpl
def register_backbones(register):
    register("hog", hog_backbone, description="HOG descriptor of the grey image (non-neural, no parameters)")
    register("color_histogram", color_histogram_backbone, description="Per-channel RGB histograms (non-neural)")
    register("lbp", lbp_backbone, description="Uniform local-binary-pattern histograms on a grid (non-neural)")
    register(
        "handcrafted",
        handcrafted_backbone,
        description="Concatenated handcrafted descriptors, kinds from hog, color, lbp (non-neural)",
    )
