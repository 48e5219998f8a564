"""Datasets in COCO-panoptic format: reading, indexing, synthetic scenes, Cityscapes import."""
