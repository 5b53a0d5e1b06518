"""Image geometry and the one place where IJK, LPS and RAS coordinates are converted.

Conventions used throughout the package:

* **World** coordinates are LPS millimetres (DICOM, ITK/SimpleITK, LUNA16). 3D Slicer's scene uses RAS:
  ``RAS = diag(-1, -1, 1) · LPS``.
* **Continuous index** ``(i, j, k)`` addresses voxel centres in ``(x, y, z)`` order, as SimpleITK's
  ``TransformContinuousIndexToPhysicalPoint`` does. Numpy arrays are indexed ``[k, j, i]``.
* **Direction** is a 3×3 matrix whose *columns* are the unit directions of the i, j, k axes in LPS.

``lps = origin + direction · diag(spacing) · ijk``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert points ``(..., 3)`` from LPS mm to RAS mm (and back: the map is its own inverse)."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


ras_to_lps = lps_to_ras


@dataclass(frozen=True)
class Geometry:
    """Voxel grid geometry of a 3D image.

    Attributes:
        spacing: voxel size along i, j, k in mm, ``(sx, sy, sz)``.
        origin: LPS position in mm of the centre of voxel ``(0, 0, 0)``.
        direction: 3×3 matrix; column ``n`` is the LPS unit direction of index axis ``n``.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        origin = tuple(float(o) for o in self.origin)
        direction = np.array(self.direction, dtype=float).reshape(3, 3)
        if len(spacing) != 3 or len(origin) != 3:
            raise ValueError("spacing and origin must have three values (x, y, z)")
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"voxel spacing must be positive, got {spacing} mm")
        if not np.all(np.isfinite(origin)):
            raise ValueError(f"image origin must be finite, got {origin}")
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
            raise ValueError("direction matrix must be orthonormal")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        direction.setflags(write=False)
        object.__setattr__(self, "direction", direction)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            np.allclose(self.spacing, other.spacing, atol=1e-6)
            and np.allclose(self.origin, other.origin, atol=1e-4)
            and np.allclose(self.direction, other.direction, atol=1e-6)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping continuous ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix mapping ``(i, j, k, 1)`` to RAS mm: Slicer's ``IJKToRASMatrix``."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> Geometry:
        """Build a geometry from Slicer's 4×4 ``IJKToRASMatrix`` (RAS mm)."""
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(matrix, dtype=float)
        axes = lps[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        return cls(tuple(spacing), tuple(lps[:3, 3]), axes / spacing)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices ``(..., 3)`` in ``(i, j, k)`` order → LPS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS mm ``(..., 3)`` → continuous indices ``(..., 3)`` in ``(i, j, k)`` order."""
        lps = np.asarray(lps, dtype=float) - np.asarray(self.origin)
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return lps @ inv.T

    def index_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices ``(i, j, k)`` → RAS mm."""
        return lps_to_ras(self.index_to_lps(ijk))

    def ras_to_index(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm → continuous indices ``(i, j, k)``."""
        return self.lps_to_index(ras_to_lps(ras))

    def with_spacing(self, spacing: tuple[float, float, float], offset_ijk=(0.0, 0.0, 0.0)) -> Geometry:
        """A grid with the same direction, new spacing, origin moved to old continuous index ``offset_ijk``."""
        return Geometry(spacing, tuple(self.index_to_lps(np.asarray(offset_ijk, dtype=float))), self.direction)

    def cropped(self, start_ijk: tuple[int, int, int]) -> Geometry:
        """The geometry of a sub-grid whose voxel ``(0, 0, 0)`` is ``start_ijk`` of this one."""
        return self.with_spacing(self.spacing, start_ijk)

    def to_dict(self) -> dict:
        """JSON-friendly form (lists of floats)."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
        }
