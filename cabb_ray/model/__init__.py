"""The panoptic network on torchvision (Mask R-CNN + FPN + semantic head + panoptic fusion),
its checkpoints and its pre-trained weights."""
