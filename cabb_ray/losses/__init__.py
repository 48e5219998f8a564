"""Loss functions: the crop-aware bounding-box loss and (later) loss balancing."""
