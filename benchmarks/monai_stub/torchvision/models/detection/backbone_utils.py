"""``_validate_trainable_layers``: how many backbone stages stay trainable (irrelevant to inference timing)."""

from __future__ import annotations


def _validate_trainable_layers(
    is_trained: bool, trainable_backbone_layers: int | None, max_value: int, default_value: int
) -> int:
    """``max_value`` for an untrained backbone; else the given count (default ``default_value``), checked."""
    if not is_trained:
        return max_value
    value = default_value if trainable_backbone_layers is None else trainable_backbone_layers
    if not 0 <= value <= max_value:
        raise ValueError(f"trainable_backbone_layers must be in [0, {max_value}], got {value}")
    return value
