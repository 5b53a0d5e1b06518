"""A stand-in for the two torchvision helpers MONAI's RetinaNet network needs, for the benchmark only.

MONAI builds its 3D ResNet-FPN feature extractor with ``torchvision.models._utils.IntermediateLayerGetter``
and ``torchvision.models.detection.backbone_utils._validate_trainable_layers``. The torchvision wheel that
matches the project's torch does not work on this CPU build, so ``benchmark.py`` puts this folder on the
``PYTHONPATH`` of the MONAI timing process (and of no other). It is enough to construct the network and
run its forward pass; it is not torchvision and provides nothing else (no box ops, no NMS, no models).
"""

__version__ = "0.0.0+benchmark-stub"
