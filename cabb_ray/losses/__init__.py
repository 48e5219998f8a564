"""Loss functions: the crop-aware bounding-box loss and the balancing of the loss terms."""
