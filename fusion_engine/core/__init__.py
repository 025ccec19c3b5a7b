"""The plugin core: plugin loading, the component registry, configs, the fused network, data."""
