"""Reports on finished searches: the paper's ablation table and size-bin plot, and how far
early stopping's rankings can be trusted (``python -m cabb_ray.report``)."""
