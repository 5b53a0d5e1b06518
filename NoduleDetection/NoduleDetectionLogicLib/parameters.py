"""The module's settings as stored in its MRML parameter node, so that a saved scene restores them.

A parameter node (``vtkMRMLScriptedModuleNode``) holds string parameters and node references; both are
written into the ``.mrml`` file when the scene is saved. The GUI reads and writes them only through this
module, and ``NoduleDetectionLogic.process`` takes the same settings as arguments.

Imports neither Qt nor torch (the panel opens before torch may be installed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from NoduleDetectionLib import registry
from NoduleDetectionLib.errors import InputError, ModelError

#: Sensitivity used when a model file's own threshold cannot be read: ``ModelConfig().threshold`` of the model
#: format. Kept here as a number because ``models`` imports torch, which is installed only at first use
#: (``Testing/test_scene.py`` checks that the two agree).
DEFAULT_THRESHOLD = 0.5

#: Device choices: parameter value → label shown in the panel.
DEVICES = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}

#: Node reference roles of the parameter node.
INPUT_VOLUME = "InputVolume"
OUTPUT_MARKUPS = "OutputMarkups"
OUTPUT_SEGMENTATION = "OutputSegmentation"
OUTPUT_TABLE = "OutputTable"
#: The table node of the latest run, shown in the panel's results table (and restored with the scene).
RESULTS_TABLE = "ResultsTable"

#: Node reference roles from a results table node to the other nodes of the same run.
ROLE_VOLUME = "NoduleDetection.Volume"
ROLE_MARKUPS = "NoduleDetection.Markups"
ROLE_SEGMENTATION = "NoduleDetection.Segmentation"


@dataclass
class DetectionSettings:
    """What a run uses besides its nodes.

    Attributes:
        model: model file path; ``""`` means the shipped model.
        threshold: report findings with probability ≥ this (0..1).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    model: str = ""
    threshold: float = DEFAULT_THRESHOLD
    device: str = "auto"

    def validate(self) -> DetectionSettings:
        """Return ``self``; raise ``InputError`` for a threshold outside 0..1 or an unknown device."""
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"sensitivity threshold must be between 0 and 1, got {self.threshold}")
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")
        return self


_NAMES = {"model": "Model", "threshold": "Threshold", "device": "Device"}


def model_threshold(model: str) -> float:
    """The default threshold stored in model file ``model`` (``""``: the shipped model), read without torch;
    ``DEFAULT_THRESHOLD`` when the file cannot be read (the run itself then reports why)."""
    try:
        path = model or registry.shipped_model_path()
    except ModelError:
        return DEFAULT_THRESHOLD
    threshold = registry.model_file_threshold(path)
    return DEFAULT_THRESHOLD if threshold is None else threshold


def set_defaults(node: Any) -> None:
    """Give every setting that ``node`` does not have yet its default value (existing ones are kept); the
    default threshold is the chosen model's own (``model_threshold``)."""
    defaults = DetectionSettings()
    for field, name in _NAMES.items():
        if not node.GetParameter(name):
            if field == "threshold":
                value = model_threshold(node.GetParameter(_NAMES["model"]))
            else:
                value = getattr(defaults, field)
            node.SetParameter(name, str(value))


def read_settings(node: Any) -> DetectionSettings:
    """The settings stored in ``node`` (defaults for missing ones); ``InputError`` if a value is unusable."""
    defaults = DetectionSettings()
    threshold = node.GetParameter(_NAMES["threshold"]) or str(defaults.threshold)
    try:
        value = float(threshold)
    except ValueError:
        raise InputError(f"sensitivity threshold {threshold!r} is not a number") from None
    return DetectionSettings(
        model=node.GetParameter(_NAMES["model"]),
        threshold=value,
        device=node.GetParameter(_NAMES["device"]) or defaults.device,
    ).validate()


def write_settings(node: Any, settings: DetectionSettings) -> None:
    """Store ``settings`` in ``node`` (one Modified event)."""
    was_modifying = node.StartModify()
    for field, name in _NAMES.items():
        node.SetParameter(name, str(getattr(settings, field)))
    node.EndModify(was_modifying)
