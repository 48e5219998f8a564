"""Experiment presets shipped with the package; a YAML config may say ``base: <name>``."""
