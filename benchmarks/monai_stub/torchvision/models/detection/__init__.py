"""``torchvision.models.detection`` stand-in: only ``backbone_utils`` (see the package docstring)."""
