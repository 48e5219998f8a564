"""The panoptic network on torchvision (issue 6) and what data sampling shares with it."""
