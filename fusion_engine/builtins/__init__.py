"""The built-in plugins, registered through fusion-engine's own entry points."""
