"""Data augmentation for both stages, on numpy patches (no torch).

Every transform is a small class whose ``__call__(image, label, rng)`` takes an image patch ``[k, j, i]``
(HU or normalised, any float/int dtype), an optional label patch of the same shape (``None`` for image-only
use) and a seeded ``np.random.Generator``, and returns ``(image, label)``; the same generator state gives the
same result. Geometric transforms move image and label together; intensity transforms leave the label alone.
Transforms that need the voxel size take the patch ``spacing`` ``(x, y, z)`` in mm at construction.

Example:
    >>> import numpy as np
    >>> from NoduleDetectionLib.augment import Compose, RandomFlip, RandomIntensity
    >>> image = np.zeros((8, 8, 8), np.float32); label = np.zeros((8, 8, 8), np.uint8)
    >>> out, lab = Compose([RandomFlip(), RandomIntensity()])(image, label, np.random.default_rng(0))
    >>> out.shape, lab.dtype
    ((8, 8, 8), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .geometry import Geometry
from .volume import CTVolume

Pair = tuple[np.ndarray, Optional[np.ndarray]]


def flip(array: Optional[np.ndarray], axes: Sequence[int]) -> Optional[np.ndarray]:
    """Flip ``array`` along each of ``axes`` (0 = k, 1 = j, 2 = i); ``None`` passes through."""
    return None if array is None else np.flip(array, axis=tuple(axes)).copy()


def rot90_axial(array: Optional[np.ndarray], k: int) -> Optional[np.ndarray]:
    """Rotate ``array [k, j, i]`` by ``k`` quarter turns in the axial (j, i) plane; ``None`` passes through."""
    return None if array is None else np.rot90(array, k, axes=(1, 2)).copy()


class RandomFlip:
    """Flip along each axis in ``axes`` with probability ``p`` (independently).

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomFlip
        >>> image = np.arange(8.0).reshape(2, 2, 2)
        >>> out, _ = RandomFlip(axes=(2,), p=1.0)(image, None, np.random.default_rng(0))
        >>> out[0, 0].tolist()
        [1.0, 0.0]
    """

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5):
        self.axes, self.p = tuple(axes), p

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        axes = [a for a in self.axes if rng.random() < self.p]
        return flip(image, axes), flip(label, axes)


class RandomRot90:
    """Rotate by a random number (0-3) of quarter turns in the axial plane (assumes equal j and i spacing).

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomRot90
        >>> image = np.zeros((1, 2, 3))
        >>> RandomRot90()(image, None, np.random.default_rng(1))[0].shape in {(1, 2, 3), (1, 3, 2)}
        True
    """

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        k = int(rng.integers(4))
        return rot90_axial(image, k), rot90_axial(label, k)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix in ``[k, j, i]`` mm coordinates: rotations about the k, j and i axes, in that order."""
    out = np.eye(3)
    for axis, a in enumerate(angles_rad):
        c, s = np.cos(a), np.sin(a)
        p, q = [n for n in range(3) if n != axis]
        r = np.eye(3)
        r[p, p], r[p, q], r[q, p], r[q, q] = c, -s, s, c
        out = r @ out
    return out


class RandomAffine:
    """Rotate (±``degrees`` about each axis) and scale (``scales``) about the patch centre, in one resample.

    Works in mm (so anisotropic voxels rotate correctly); the image is interpolated linearly (edges
    replicated), the label by nearest neighbour (outside = 0). A scale above 1 enlarges the content.
    ``elastic_mm`` > 0 also bends the content, in the same resample: each point moves by a smooth random
    displacement, normal with that standard deviation (mm, each axis) at control points about ``elastic_grid_mm``
    apart and linear between them.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomAffine
        >>> image = np.zeros((9, 9, 9), np.float32); image[4, 4, 4] = 1
        >>> label = (image > 0).astype(np.uint8)
        >>> out, lab = RandomAffine(degrees=15, scales=(0.8, 1.2))(image, label, np.random.default_rng(0))
        >>> int(lab[4, 4, 4])
        1
    """

    def __init__(self, degrees: float = 15.0, scales: tuple[float, float] = (0.8, 1.2),
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), elastic_mm: float = 0.0, elastic_grid_mm: float = 12.0):
        self.degrees, self.scales = degrees, scales
        self.spacing_kji = np.asarray(spacing, float)[::-1]
        self.elastic_mm, self.elastic_grid_mm = elastic_mm, elastic_grid_mm

    def _displacement(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Smooth random displacement ``float32 [3, k, j, i]`` in input voxels (see the class docs)."""
        size = np.asarray(shape)
        points = np.maximum(np.round((size - 1) * self.spacing_kji / self.elastic_grid_mm).astype(int) + 1, 2)
        field = rng.normal(0.0, self.elastic_mm, (3, *points)) / self.spacing_kji[:, None, None, None]
        for axis in range(3):  # linear interpolation, one axis at a time, corner to corner
            position = np.linspace(0.0, points[axis] - 1.0, size[axis])
            weights = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(points[axis])[None, :]))
            field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis + 1])), 0, axis + 1)
        return field.astype(np.float32)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        angles = np.deg2rad(rng.uniform(-self.degrees, self.degrees, 3))
        scale = rng.uniform(*self.scales)
        s = np.diag(self.spacing_kji)
        # output index o -> input index: S^-1 · R^T · S · (o - c) / scale + c
        matrix = np.linalg.inv(s) @ _rotation(angles).T @ s / scale
        centre = (np.asarray(image.shape) - 1) / 2.0
        offset = centre - matrix @ centre
        image32 = image.astype(np.float32, copy=False)
        if self.elastic_mm > 0:
            grid = np.indices(image.shape, dtype=np.float32).reshape(3, -1)
            coords = (matrix @ grid + offset[:, None]).reshape(3, *image.shape)
            coords += self._displacement(image.shape, rng)
            out = ndimage.map_coordinates(image32, coords, order=1, mode="nearest").astype(image.dtype, copy=False)
            lab = None if label is None else ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
            return out, lab
        out = ndimage.affine_transform(image32, matrix, offset, order=1,
                                       mode="nearest").astype(image.dtype, copy=False)
        if label is None:
            return out, None
        lab = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
        return out, lab


class RandomIntensity:
    """Scale HU by a factor in ``scale`` and shift by an offset in ``offset`` (HU): ``image · a + b``.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomIntensity
        >>> out, _ = RandomIntensity(scale=(2, 2), offset=(1, 1))(np.ones((2, 2, 2)), None, np.random.default_rng())
        >>> float(out.max())
        3.0
    """

    def __init__(self, scale: tuple[float, float] = (0.95, 1.05), offset: tuple[float, float] = (-20.0, 20.0)):
        self.scale, self.offset = scale, offset

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        a, b = rng.uniform(*self.scale), rng.uniform(*self.offset)
        return (image.astype(np.float32) * np.float32(a) + np.float32(b)), label


class RandomNoise:
    """Add Gaussian noise whose std (HU) is drawn from ``std``, optionally correlated in-plane.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomNoise
        >>> out, _ = RandomNoise(std=(10, 10))(np.zeros((4, 32, 32)), None, np.random.default_rng(0))
        >>> bool(8 < out.std() < 12)
        True
    """

    def __init__(self, std: tuple[float, float] = (0.0, 25.0), correlation_voxels: float = 0.0):
        self.std, self.correlation = std, correlation_voxels

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        sigma = rng.uniform(*self.std)
        noise = rng.standard_normal(image.shape).astype(np.float32)
        if self.correlation > 0:
            noise = ndimage.gaussian_filter(noise, (0.0, self.correlation, self.correlation))
            noise /= max(float(noise.std()), 1e-6)
        return image.astype(np.float32) + np.float32(sigma) * noise, label


class RandomGamma:
    """Raise a normalised image (``[0, 1]``: the HU window) to a power drawn log-uniformly from ``gamma``: other
    scanners' and breath-holds' lung and soft-tissue levels. Values outside ``[0, 1]`` are clipped first.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomGamma
        >>> out, _ = RandomGamma((2.0, 2.0))(np.full((2, 2, 2), 0.5), None, np.random.default_rng(0))
        >>> float(out.max())
        0.25
    """

    def __init__(self, gamma: tuple[float, float] = (0.8, 1.25)):
        self.log_gamma = (float(np.log(gamma[0])), float(np.log(gamma[1])))

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        g = np.float32(np.exp(rng.uniform(*self.log_gamma)))
        return np.clip(image.astype(np.float32), 0.0, 1.0) ** g, label


class RandomSharpness:
    """Another reconstruction kernel: ``image + a · (image − gaussian(image, σ))`` with σ (voxels) drawn from
    ``sigma`` and ``a`` from ``amount`` (``a`` < 0 smooths, ``a`` = -1 is the blur itself; ``a`` > 0 sharpens).

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomSharpness
        >>> image = np.zeros((9, 9, 9), np.float32); image[4, 4, 4] = 1
        >>> out, _ = RandomSharpness(sigma=(1, 1), amount=(-1, -1))(image, None, np.random.default_rng(0))
        >>> bool(0 < out[4, 4, 4] < 1)
        True
    """

    def __init__(self, sigma: tuple[float, float] = (0.5, 1.0), amount: tuple[float, float] = (-0.7, 1.0)):
        self.sigma, self.amount = sigma, amount

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        sigma, a = rng.uniform(*self.sigma), np.float32(rng.uniform(*self.amount))
        image = image.astype(np.float32)
        return image + a * (image - ndimage.gaussian_filter(image, sigma, mode="nearest")), label


class RandomConvolution:
    """Another texture, same anatomy: with probability ``p``, pass the patch through a small convolution network
    with random weights (``layers`` 3×3×3 convolutions, ``channels`` wide, leaky ReLUs between), give its output
    the patch's mean and standard deviation (and its polarity: bright stays bright), and blend the two by a
    weight drawn from ``mix``. Shapes and positions stay, noise grain, edges and intensity curves change: a
    network that must find lesions through this relies on shape more than on one scanner's texture (the idea
    of random-convolution augmentation for unseen domains, e.g. Ouyang et al.'s global intensity
    non-linearity). The label is left alone.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomConvolution
        >>> image = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
        >>> out, _ = RandomConvolution(p=1.0, mix=(1.0, 1.0))(image, None, np.random.default_rng(0))
        >>> bool(abs(out.mean() - image.mean()) < 1e-5 and abs(out.std() - image.std()) < 1e-5)
        True
    """

    def __init__(self, p: float = 0.5, layers: tuple[int, int] = (2, 4), channels: int = 2,
                 mix: tuple[float, float] = (0.0, 1.0), slope: float = 0.2):
        self.p, self.layers, self.channels, self.mix, self.slope = p, layers, channels, mix, slope

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        if rng.random() >= self.p:
            return image, label
        image = image.astype(np.float32)
        maps = [image]
        depth = int(rng.integers(self.layers[0], self.layers[1] + 1))
        for layer in range(depth):
            width = 1 if layer == depth - 1 else self.channels
            kernels = rng.standard_normal((width, len(maps), 3, 3, 3)).astype(np.float32)
            kernels /= np.float32(np.sqrt(27 * len(maps)))
            maps = [sum(ndimage.correlate(m, k, mode="nearest") for m, k in zip(maps, row)) for row in kernels]
            if layer < depth - 1:
                maps = [np.where(m > 0, m, np.float32(self.slope) * m) for m in maps]
        mean = image.mean()
        out = maps[0] - maps[0].mean()
        if float((out * (image - mean)).sum()) < 0:
            out = -out
        out = out * np.float32(float(image.std()) / max(float(out.std()), 1e-6)) + mean
        a = np.float32(rng.uniform(*self.mix))
        return (a * out + (1 - a) * image).astype(np.float32), label


def _box_kernel(width: float) -> np.ndarray:
    """Normalised 1D box of ``width`` samples (fractional ends), centred on the middle sample."""
    half = width / 2.0
    n = int(np.ceil(half - 0.5))
    x = np.arange(-n, n + 1)
    w = np.clip(half + 0.5 - np.abs(x), 0.0, 1.0)
    return w / w.sum()


def _sample_axis0(array: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along axis 0 at fractional ``positions`` (clamped to the ends)."""
    p = np.clip(positions, 0, array.shape[0] - 1)
    lo = np.floor(p).astype(int)
    hi = np.minimum(lo + 1, array.shape[0] - 1)
    f = (p - lo).astype(np.float32).reshape(-1, *([1] * (array.ndim - 1)))
    return array[lo] * (1 - f) + array[hi] * f


class RandomSliceThickness:
    """Simulate a thicker reconstruction: average along k over a slice thickness drawn from ``thickness`` (mm),
    sample slices at that spacing, and interpolate back to the patch grid. The label is unchanged (it is the
    truth on the patch grid). Thicknesses at or below the patch's k spacing leave the patch as it is.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import RandomSliceThickness
        >>> image = np.zeros((16, 2, 2), np.float32); image[8] = 100
        >>> out, _ = RandomSliceThickness((4.0, 4.0), spacing=(1, 1, 1))(image, None, np.random.default_rng(0))
        >>> bool(out[8, 0, 0] < 100 and out[7, 0, 0] > 0)
        True
    """

    def __init__(self, thickness: tuple[float, float] = (0.6, 5.0), spacing: Sequence[float] = (1.0, 1.0, 1.0)):
        self.thickness = thickness
        self.dz = float(spacing[2])

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        width = rng.uniform(*self.thickness) / self.dz  # in patch slices
        if width <= 1.0:
            return image, label
        thick = ndimage.correlate1d(image.astype(np.float32), _box_kernel(width), axis=0, mode="nearest")
        start = rng.uniform(0.0, width)
        centres = np.arange(start - width, image.shape[0] + width, width)
        slices = _sample_axis0(thick, centres)
        back = (np.arange(image.shape[0]) - centres[0]) / width
        return _sample_axis0(slices, back), label


def thicken_volume(volume: CTVolume, thickness_mm: float) -> CTVolume:
    """``volume`` reconstructed with contiguous slices ``thickness_mm`` thick: the HU averaged over each slab of
    that thickness along k (fractional slices at its ends weighted by their share), one slice per slab, so the
    new k spacing is ``thickness_mm``. Slab centres keep their LPS positions; a voxel is padding if any voxel of
    its slab was. ``metadata["slice_thickness_mm"]`` is set, so inserted lesions are imaged with that thickness.
    A thickness at or below the k spacing returns ``volume`` unchanged.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import thicken_volume
        >>> from NoduleDetectionLib.geometry import Geometry
        >>> from NoduleDetectionLib.volume import CTVolume
        >>> v = CTVolume(np.arange(8, dtype=np.float32).reshape(8, 1, 1), Geometry((1, 1, 1), (0, 0, 0)))
        >>> t = thicken_volume(v, 2.0)
        >>> t.array.ravel().tolist(), t.geometry.spacing[2], t.geometry.origin[2]
        ([0.5, 2.5, 4.5, 6.5], 2.0, 0.5)
    """
    dz = volume.geometry.spacing[2]
    width = float(thickness_mm) / dz  # in input slices
    if width <= 1.0:
        return volume
    count = int(np.floor(volume.array.shape[0] / width))
    if count < 1:
        raise ValueError(f"a {thickness_mm} mm slab is thicker than the scan ({volume.array.shape[0] * dz:.1f} mm)")
    centres = (np.arange(count) + 0.5) * width - 0.5  # slab centres in input slices
    src = volume.array
    array = np.empty((count, *src.shape[1:]), np.float32)
    padding = None if volume.padding_mask is None else np.zeros(array.shape, bool)
    for n in range(count):
        start, stop = n * width - 0.5, (n + 1) * width - 0.5  # the slab in input slice units
        ks = np.arange(max(int(np.floor(start + 0.5)), 0), min(int(np.ceil(stop + 0.5)), src.shape[0]))
        share = np.clip(np.minimum(ks + 0.5, stop) - np.maximum(ks - 0.5, start), 0.0, 1.0)
        array[n] = np.tensordot(share / share.sum(), src[ks].astype(np.float32), axes=1)
        if padding is not None:
            padding[n] = volume.padding_mask[ks[share > 0]].any(axis=0)
    g = volume.geometry
    origin = np.asarray(g.origin) + g.direction[:, 2] * dz * centres[0]
    geometry = Geometry((g.spacing[0], g.spacing[1], float(thickness_mm)), tuple(origin), g.direction)
    dtype = volume.array.dtype
    if np.issubdtype(dtype, np.integer):
        array = np.rint(array)
    return dataclasses.replace(volume, array=array.astype(dtype), geometry=geometry, padding_mask=padding,
                               metadata={**volume.metadata, "slice_thickness_mm": float(thickness_mm)})


class Compose:
    """Apply transforms in order, each with the same generator.

    Example:
        >>> import numpy as np
        >>> from NoduleDetectionLib.augment import Compose, RandomFlip, RandomRot90
        >>> t = Compose([RandomFlip(), RandomRot90()])
        >>> a = t(np.arange(27.0).reshape(3, 3, 3), None, np.random.default_rng(5))[0]
        >>> b = t(np.arange(27.0).reshape(3, 3, 3), None, np.random.default_rng(5))[0]
        >>> bool((a == b).all())
        True
    """

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label
