"""The CT volume that flows through the pipeline: HU voxels plus LPS geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import Geometry

#: HU given to voxels outside the reconstructed field of view (scanner padding), i.e. air.
AIR_HU = -1024


@dataclass
class CTVolume:
    """A CT scan in Hounsfield units.

    Attributes:
        array: HU values, ``int16`` or ``float32``, indexed ``[k, j, i]`` (z, y, x). Scanner padding
            (e.g. -2048, -3024 outside the reconstruction circle) has already been replaced by
            ``AIR_HU`` so that it never reaches a model as tissue.
        geometry: voxel grid geometry (LPS mm).
        name: short name used for output files (file stem, or folder name for DICOM).
        series_uid: LUNA16 ``seriesuid``: SeriesInstanceUID for DICOM, the file stem otherwise.
        padding_mask: ``True`` where the scanner wrote padding, ``[k, j, i]``; ``None`` if none.
        metadata: free-form facts from the reader (modality, series description, notes).
    """

    array: np.ndarray
    geometry: Geometry
    name: str = "volume"
    series_uid: str = ""
    padding_mask: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a CT volume must be 3D, got an array of shape {self.array.shape}")
        if not self.series_uid:
            self.series_uid = self.name

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Grid size in ``(i, j, k)`` order."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.geometry.spacing))
