"""cabb_ray: crop-aware panoptic training and hyperparameter search on Ray."""

__version__ = "0.1.0"
