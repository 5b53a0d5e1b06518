"""Synthetic lung lesions inserted into real chest CT: the training labels of stage 1 and stage 2.

A lesion is an implicit shape rendered on a fine sub-grid around its centre, blended into the host scan with
a partial-volume and scanner model, and written into a label map. The host's own vessels, airways, fissures
and chest wall stay untouched around it, so they remain the hard negatives.

Model of one lesion (all lengths in mm, arrays indexed ``[k, j, i]``):

* **Shape**: a sphere of the requested equivalent diameter, made slightly ellipsoidal and perturbed by smooth
  radial bumps (``round``: barely, ``lobulated``: 4-8 clear lobes); ``spiculated`` adds 16-30 tapering
  spikes (1-3 mm wide at the base, 3-15 mm long). The bump field is rescaled so that the body's volume
  equals the requested sphere's.
* **Texture**: ``solid`` 0..+50 HU, ``ground-glass`` -650..-350 HU, ``part-solid`` = ground glass with an
  eccentric solid core of 30-60 % of the radius; each with smooth density heterogeneity (Gaussian blobs).
* **Partial volume**: the fine occupancy ``α`` and ``α·HU`` are box-integrated over each host voxel (along k
  over the slice thickness), then blurred by a Gaussian point-spread function (default 0.6 mm in-plane).
* **Blend**: a lesion only *adds* density: with ``α' = α`` where the lesion is denser than the host and 0
  elsewhere, ``new = (1 - G*α')·host + G*(α'·lesion)`` (``G*`` = the PSF blur; the host already carries the
  scanner's blur, so it is not blurred again). Where the host is already denser (a vessel crossing a
  ground-glass lesion, the chest wall behind a juxtapleural one) the host wins, so nothing is painted over
  the wall or over vessels.
* **Noise**: blending scales the host's own noise by ``(1 - w)`` (``w`` = blurred blend weight); correlated
  Gaussian noise of std ``σ·sqrt(1 - (1 - w)²)`` is added *inside the footprint only*, so the lesion carries
  the host's noise level and the background keeps the host's real noise. ``σ`` comes from
  :func:`estimate_noise_std`.
* **Label**: host-grid occupancy ``≥ 0.5``, restricted to the aerated lung (vessels inside it included) or to
  voxels where the lesion added at least ``LABEL_MIN_ADDED_HU``; so the part of a juxtapleural lesion that
  merges with the chest wall is not labelled.

Placement (distances from a local analysis of the host around a random seed, never on the whole scan):
the *pleural lung* is ``lung_mask & HU < -500`` closed with a 2.5 mm ball (so vessels < 5 mm are inside it);
its boundary is the pleura / mediastinum / large hilar structures. ``free``: centre at least
``radius + 3 mm`` from that boundary. ``juxtapleural``: centre ``radius - 1.5 .. radius - 0.25 mm`` from it, so
the lesion touches the wall. ``juxtavascular``: centre ``radius ± 0.5 mm`` from a vessel voxel (pleural lung
and HU > -300) and at least ``radius + 2 mm`` from the boundary. Lesions keep ``LESION_GAP_MM`` from each
other and ``AVOID_MARGIN_MM`` from the ``avoid`` regions (e.g. excluded findings with radius
``max(diameter / 2, 5 mm)``, see :func:`avoid_radius_mm`).

Known limit: the lumen of large airways is air and counts as lung, so a small ``free`` lesion can, rarely, be
placed inside a main bronchus.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .atomic import atomic_path
from .errors import InputError
from .volume import CTVolume

log = logging.getLogger(__name__)

TEXTURES = ("solid", "part-solid", "ground-glass")
SHAPES = ("round", "lobulated", "spiculated")
POSITIONS = ("free", "juxtavascular", "juxtapleural")
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 30.0

#: HU below which a voxel inside the lung mask counts as aerated lung.
PARENCHYMA_MAX_HU = -500.0
#: HU above which a voxel inside the pleural lung counts as a vessel (or another dense structure).
VESSEL_MIN_HU = -300.0
#: Radius (mm) of the closing that puts small vessels inside the pleural lung.
VESSEL_FILL_MM = 2.5
#: Clearance (mm) between a free lesion's surface and the pleural boundary.
FREE_CLEARANCE_MM = 3.0
#: Gap (mm) kept between the outer extents (spikes included) of two inserted lesions.
LESION_GAP_MM = 2.0
#: Margin (mm) kept between a lesion's outer extent and an ``avoid`` region's radius.
AVOID_MARGIN_MM = 3.0
#: Voxels outside the pleural lung are labelled only where the lesion added this many HU.
LABEL_MIN_ADDED_HU = 50.0
#: Vessel-like distractors (``insert_distractors``): root radius (mm), length of the main branch (mm), density (HU).
DISTRACTOR_RADIUS_MM = (0.6, 2.5)
DISTRACTOR_LENGTH_MM = (8.0, 30.0)
DISTRACTOR_HU = (-50.0, 60.0)


def avoid_radius_mm(diameter_mm: float) -> float:
    """Radius (mm) masked around a known finding: ``max(diameter / 2, 5 mm)``; point marks (``-1``) get 5 mm."""
    return max(float(diameter_mm) / 2.0, 5.0)


@dataclass(frozen=True)
class LesionSpec:
    """What to insert.

    Attributes:
        diameter_mm: equivalent-sphere diameter of the lesion body (spikes excluded), 3-30 mm.
        texture: ``"solid"``, ``"part-solid"`` or ``"ground-glass"``.
        shape: ``"round"``, ``"lobulated"`` or ``"spiculated"``.
        position: ``"free"``, ``"juxtavascular"`` or ``"juxtapleural"``.
        seed: seed of the lesion's own shape, texture and noise (placement uses the caller's generator).
    """

    diameter_mm: float
    texture: str = "solid"
    shape: str = "round"
    position: str = "free"
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_DIAMETER_MM <= float(self.diameter_mm) <= MAX_DIAMETER_MM:
            raise InputError(f"lesion diameter must be {MIN_DIAMETER_MM}-{MAX_DIAMETER_MM} mm, got {self.diameter_mm}")
        for value, allowed in ((self.texture, TEXTURES), (self.shape, SHAPES), (self.position, POSITIONS)):
            if value not in allowed:
                raise InputError(f"unknown lesion property {value!r}; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class LesionMix:
    """Distribution of :func:`sample_lesion_specs`.

    Attributes:
        median_diameter_mm: median of the log-normal diameter distribution (clipped to 3-30 mm by redrawing).
        log_sigma: standard deviation of ``log(diameter)``.
        textures, shapes, positions: probabilities of each kind, in the order of ``TEXTURES``, ``SHAPES``,
            ``POSITIONS``.
    """

    median_diameter_mm: float = 6.5
    log_sigma: float = 0.55
    textures: tuple[float, float, float] = (0.75, 0.10, 0.15)
    shapes: tuple[float, float, float] = (0.45, 0.35, 0.20)
    positions: tuple[float, float, float] = (0.40, 0.30, 0.30)


#: LUNA16-like mix: mostly small (median 6.5 mm, ~85 % under 10 mm) solid nodules.
LUNA16_LIKE = LesionMix()


def sample_lesion_specs(n: int, rng: np.random.Generator, mix: LesionMix = LUNA16_LIKE) -> list[LesionSpec]:
    """Draw ``n`` lesion specifications (diameters in mm, kinds mixed as ``mix`` says)."""
    specs = []
    for _ in range(n):
        d = 0.0
        while not MIN_DIAMETER_MM <= d <= MAX_DIAMETER_MM:
            d = float(rng.lognormal(np.log(mix.median_diameter_mm), mix.log_sigma))
        specs.append(LesionSpec(
            diameter_mm=round(d, 2),
            texture=str(rng.choice(TEXTURES, p=np.asarray(mix.textures) / sum(mix.textures))),
            shape=str(rng.choice(SHAPES, p=np.asarray(mix.shapes) / sum(mix.shapes))),
            position=str(rng.choice(POSITIONS, p=np.asarray(mix.positions) / sum(mix.positions))),
            seed=int(rng.integers(2**31 - 1)),
        ))
    return specs


@dataclass(frozen=True)
class InsertedLesion:
    """One inserted lesion.

    Attributes:
        center_lps: centroid of its label voxels, LPS mm.
        diameter_mm: equivalent-sphere diameter of its label (mm).
        spec: what was asked for.
        label: its value in the label map (1..N).
    """

    center_lps: tuple[float, float, float]
    diameter_mm: float
    spec: LesionSpec
    label: int


# --------------------------------------------------------------------------------------------- shapes


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors ``(n, 3)``."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = np.pi * (1.0 + 5**0.5) * k
    r = np.sqrt(1.0 - z * z)
    return np.stack([z, r * np.cos(phi), r * np.sin(phi)], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass
class _Shape:
    """An implicit lesion shape centred at the origin of a local mm frame (axes k, j, i)."""

    radius: float
    rotation: np.ndarray
    axes: np.ndarray
    bump_dirs: np.ndarray
    bump_amp: np.ndarray
    bump_kappa: np.ndarray
    edge_mm: float
    spike_dirs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    spike_len: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spike_radius: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def random(cls, radius: float, shape: str, edge_mm: float, rng: np.random.Generator) -> _Shape:
        """Draw a shape whose body has the volume of a sphere of ``radius`` mm."""
        if shape == "round":
            elong, n_bumps, amp = 0.08, 4, (0.0, 0.04)
        else:
            elong, n_bumps, amp = 0.15, int(rng.integers(4, 9)), (0.15, 0.35)
        axes = np.exp(rng.uniform(-elong, elong, 3))
        axes /= np.prod(axes) ** (1 / 3)
        s = cls(radius=radius, rotation=_random_rotation(rng), axes=axes, bump_dirs=_unit(rng, n_bumps),
                bump_amp=rng.uniform(*amp, n_bumps), bump_kappa=rng.uniform(6.0, 16.0, n_bumps), edge_mm=edge_mm)
        mean_cube = float(np.mean(s._relative_radius(_fibonacci_sphere(2000)) ** 3))
        s.radius = radius / mean_cube ** (1 / 3)
        if shape == "spiculated":
            n = int(rng.integers(16, 31))
            s.spike_dirs = _unit(rng, n)
            s.spike_len = np.clip(rng.uniform(0.6, 1.5, n) * radius, 3.0, 15.0)
            s.spike_radius = np.minimum(rng.uniform(0.5, 1.0, n), 0.3 * radius)
        return s

    def _relative_radius(self, u: np.ndarray) -> np.ndarray:
        """Radius (in units of ``self.radius``) of the bump field along unit vectors ``u (..., 3)``."""
        dots = u @ self.bump_dirs.T
        return 1.0 + np.sum(self.bump_amp * np.exp(self.bump_kappa * (dots - 1.0)), axis=-1)

    def surface_distance(self, d: np.ndarray) -> np.ndarray:
        """Distance (mm) from the centre to the body surface along unit vectors ``d (n, 3)``."""
        y = (d @ self.rotation) / self.axes
        norm = np.linalg.norm(y, axis=1)
        return self.radius * self._relative_radius(y / norm[:, None]) / norm

    @property
    def extent_mm(self) -> float:
        """Radius (mm) of a ball that holds the whole lesion, spikes and soft edge included."""
        body = float(self.surface_distance(_fibonacci_sphere(2000)).max())
        spikes = float(np.max(self.surface_distance(self.spike_dirs) + self.spike_len)) if len(self.spike_len) else 0
        return max(body, spikes) + self.edge_mm

    @property
    def body_max_mm(self) -> float:
        """Largest distance (mm) from the centre to the body surface."""
        return float(self.surface_distance(_fibonacci_sphere(2000)).max())

    def occupancy(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Soft occupancy 0..1 at local mm coordinates (broadcastable k, j, i axes)."""
        pts = np.stack(np.broadcast_arrays(z, y, x), axis=-1).astype(np.float32)
        q = (pts @ self.rotation.astype(np.float32)) / self.axes.astype(np.float32)
        rho = np.linalg.norm(q, axis=-1)
        scale = np.float32(np.mean(self.axes))
        # The bump field lies between radius and radius·(1 + Σ amp): evaluate it only in that shell.
        alpha = (rho < self.radius).astype(np.float32)
        shell = (rho >= self.radius - self.edge_mm / scale) & (
            rho <= self.radius * (1.0 + self.bump_amp.sum()) + self.edge_mm / scale)
        qs, rs = q[shell], rho[shell]
        sd = (rs - self.radius * self._relative_radius(qs / np.maximum(rs, 1e-6)[:, None])) * scale
        alpha[shell] = np.clip(0.5 - sd / self.edge_mm, 0.0, 1.0)
        r2 = np.sum(pts * pts, axis=-1)
        for d, length, rad, base in zip(self.spike_dirs, self.spike_len, self.spike_radius,
                                        self.surface_distance(self.spike_dirs)):
            t = pts @ d.astype(np.float32)
            perp = np.sqrt(np.maximum(r2 - t * t, 0.0))
            tip = base + length
            taper = rad * (0.3 + 1.2 * np.clip((tip - t) / length, 0.0, 1.0))  # broad base, thin tip
            spike = np.clip(0.5 + (taper - perp) / self.edge_mm, 0.0, 1.0) * ((t >= 0) & (t <= tip))
            alpha = np.maximum(alpha, spike)
        return alpha.astype(np.float32)


@dataclass
class _Lesion:
    """Shape + texture of one lesion, drawn from its spec's seed."""

    spec: LesionSpec
    body: _Shape
    base_hu: float
    blobs: list  # (centre (3,), sigma, amplitude)
    core: Optional[_Shape] = None
    core_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))
    core_hu: float = 0.0

    @classmethod
    def from_spec(cls, spec: LesionSpec) -> _Lesion:
        rng = np.random.default_rng(spec.seed)
        radius = spec.diameter_mm / 2.0
        glass = spec.texture != "solid"
        body = _Shape.random(radius, spec.shape, 2.0 if glass else 0.3, rng)
        base = rng.uniform(-650.0, -350.0) if glass else rng.uniform(0.0, 50.0)
        mean, amp, n_blobs, size = (20.0, 45.0, int(rng.integers(6, 13)), (0.15, 0.35)) if glass else (
            0.0, 20.0, 5, (0.25, 0.5))
        blobs = [(_unit(rng, 1)[0] * rng.uniform(0, 0.9) * radius,
                  max(1.0, rng.uniform(*size) * radius), rng.normal(mean, amp)) for _ in range(n_blobs)]
        lesion = cls(spec=spec, body=body, base_hu=base, blobs=blobs)
        if spec.texture == "part-solid":
            core_r = rng.uniform(0.3, 0.6) * radius
            lesion.core = _Shape.random(core_r, "lobulated" if spec.shape != "round" else "round", 0.3, rng)
            lesion.core_offset = _unit(rng, 1)[0] * rng.uniform(0.0, 0.8) * (radius - core_r)
            lesion.core_hu = rng.uniform(0.0, 50.0)
        return lesion

    def render(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Occupancy and lesion HU at local mm coordinates (k, j, i axes, broadcastable)."""
        alpha = self.body.occupancy(z, y, x)
        hu = np.full(alpha.shape, self.base_hu, np.float32)
        for c, sigma, a in self.blobs:
            c0, c1, c2 = (float(v) for v in c)
            hu += np.float32(a) * np.exp(-((z - c0) ** 2 + (y - c1) ** 2 + (x - c2) ** 2) / np.float32(2 * sigma**2))
        if self.core is not None:
            o = self.core_offset
            beta = self.core.occupancy(z - o[0], y - o[1], x - o[2])
            solid = np.float32(self.core_hu) + (hu - np.float32(self.base_hu)) / 3.0
            hu = hu + beta * (solid - hu)
            alpha = np.maximum(alpha, beta)
        return alpha, hu


@dataclass
class _Vessel:
    """A short tapering tube bent at a few points, with at most one side branch: segments ``starts -> ends``
    (local mm, axes k, j, i, centred on the mean of the main branch's points) and radii ``r0 -> r1`` along each."""

    starts: np.ndarray
    ends: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    hu: float
    edge_mm: float = 0.3

    @classmethod
    def random(cls, rng: np.random.Generator, pieces: int = 4) -> _Vessel:
        length = rng.uniform(*DISTRACTOR_LENGTH_MM)
        radii = rng.uniform(*DISTRACTOR_RADIUS_MM) * np.linspace(1.0, rng.uniform(0.5, 0.9), pieces + 1)
        direction, points, directions = _unit(rng, 1)[0], [np.zeros(3)], []
        for _ in range(pieces):
            direction = direction + rng.normal(0.0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            directions.append(direction)
            points.append(points[-1] + direction * length / pieces)
        pts = np.array(points) - np.mean(points, axis=0)
        starts, ends, r0, r1 = list(pts[:-1]), list(pts[1:]), list(radii[:-1]), list(radii[1:])
        if rng.random() < 0.6:  # a bifurcation, where real vessels give most false positives
            at = int(rng.integers(1, pieces))
            side = np.cross(directions[at], _unit(rng, 1)[0])
            angle = np.deg2rad(rng.uniform(25.0, 60.0))
            branch = np.cos(angle) * directions[at] + np.sin(angle) * side / np.linalg.norm(side)
            radius = radii[at] * rng.uniform(0.5, 0.85)
            starts.append(pts[at])
            ends.append(pts[at] + branch * rng.uniform(0.3, 0.7) * length)
            r0.append(radius)
            r1.append(0.7 * radius)
        return cls(np.array(starts), np.array(ends), np.array(r0), np.array(r1), float(rng.uniform(*DISTRACTOR_HU)))

    @property
    def extent_mm(self) -> float:
        """Radius (mm) of a ball around the local origin that holds the whole tube."""
        reach = np.linalg.norm(np.concatenate([self.starts, self.ends]), axis=1).max()
        return float(reach + self.r0.max() + self.edge_mm)

    def render(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Occupancy and HU at local mm coordinates (k, j, i axes, broadcastable)."""
        pts = np.stack(np.broadcast_arrays(z, y, x), axis=-1).astype(np.float32)
        sd = np.full(pts.shape[:-1], np.inf, np.float32)
        for a, b, ra, rb in zip(self.starts.astype(np.float32), self.ends.astype(np.float32), self.r0, self.r1):
            v = b - a
            t = np.clip(((pts - a) @ v) / np.float32(v @ v), 0.0, 1.0)
            dist = np.linalg.norm(pts - a - t[..., None] * v, axis=-1)
            sd = np.minimum(sd, dist - np.float32(ra) - np.float32(rb - ra) * t)
        alpha = np.clip(0.5 - sd / np.float32(self.edge_mm), 0.0, 1.0)
        return alpha, np.full(alpha.shape, self.hu, np.float32)


# --------------------------------------------------------------------------------------------- host analysis


def estimate_noise_std(array: np.ndarray, n_slices: int = 8, window: int = 7) -> float:
    """Noise standard deviation (HU) of a CT ``[k, j, i]``, from homogeneous soft tissue.

    On ``n_slices`` evenly spaced axial slices the local in-plane std over ``window × window`` voxels is taken
    where the local mean is soft tissue (0..100 HU); the median over those voxels is returned (aerated lung,
    -950..-750 HU, is used when the scan has no soft tissue). Edges are a minority there, so the median is
    the noise of flat tissue (slightly underestimated when the noise is strongly correlated).
    """
    ks = np.unique(np.linspace(0, array.shape[0] - 1, min(n_slices, array.shape[0])).round().astype(int))
    stds, means = [], []
    for k in ks:
        sl = array[k].astype(np.float64)
        m = ndimage.uniform_filter(sl, window)
        v = ndimage.uniform_filter(sl * sl, window) - m * m
        stds.append(np.sqrt(np.maximum(v, 0.0) * window**2 / (window**2 - 1)))
        means.append(m)
    std, mean = np.concatenate([s.ravel() for s in stds]), np.concatenate([m.ravel() for m in means])
    for lo, hi in ((0.0, 100.0), (-950.0, -750.0)):
        sel = (mean > lo) & (mean < hi)
        if sel.sum() > 1000:
            return float(np.median(std[sel]))
    raise InputError("cannot estimate the scan's noise: it has neither soft tissue nor aerated lung")


def _ellipsoid(radius_mm: float, spacing_kji: np.ndarray) -> np.ndarray:
    r = np.maximum(1, np.round(radius_mm / spacing_kji)).astype(int)
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    return (zz * spacing_kji[0]) ** 2 + (yy * spacing_kji[1]) ** 2 + (xx * spacing_kji[2]) ** 2 <= radius_mm**2


def _pleural_lung(host: np.ndarray, lung: np.ndarray, spacing_kji: np.ndarray) -> np.ndarray:
    """Aerated lung closed by ``VESSEL_FILL_MM`` (small vessels inside), within ``lung``; a local box."""
    ball = _ellipsoid(VESSEL_FILL_MM, spacing_kji)
    pad = [(s // 2, s // 2) for s in ball.shape]
    air = np.pad(lung & (host < PARENCHYMA_MAX_HU), pad, mode="edge")
    closed = ndimage.binary_closing(air, structure=ball)
    return closed[tuple(slice(p, -p or None) for p, _ in pad)] & lung


def _box(center: np.ndarray, half_mm: np.ndarray, spacing_kji: np.ndarray, shape: Sequence[int]):
    """Integer ``[k, j, i]`` bounds of a box of half-size ``half_mm`` around continuous index ``center``."""
    lo = np.maximum(np.floor(center - half_mm / spacing_kji).astype(int), 0)
    hi = np.minimum(np.ceil(center + half_mm / spacing_kji).astype(int) + 1, np.asarray(shape))
    return lo, hi


# --------------------------------------------------------------------------------------------- insertion


@dataclass
class _Placed:
    center_mm: np.ndarray  # continuous index [k, j, i] × spacing
    extent_mm: float


class _Host:
    """The host scan and what placement needs from it (seed voxels, spacing, noise)."""

    def __init__(self, volume: CTVolume, lung_mask: np.ndarray, avoid, noise_std: Optional[float]):
        if lung_mask.shape != volume.array.shape:
            raise InputError(f"lung mask shape {lung_mask.shape} differs from the CT's {volume.array.shape}")
        self.array = volume.array
        self.lung = lung_mask.astype(bool, copy=False)
        self.spacing = np.asarray(volume.geometry.spacing[::-1], dtype=float)
        self.geometry = volume.geometry
        self.metadata = volume.metadata
        air = self.lung & (self.array < PARENCHYMA_MAX_HU)
        self.seeds = np.flatnonzero(air)
        if len(self.seeds) == 0:
            raise InputError("the lung mask holds no aerated lung (< -500 HU): nothing to insert lesions into")
        self._edge_seeds: Optional[np.ndarray] = None
        self.noise_std = estimate_noise_std(self.array) if noise_std is None else float(noise_std)
        self.avoid = [(volume.geometry.lps_to_index(np.asarray(c, float))[::-1] * self.spacing, float(r))
                      for c, r in avoid]

    @property
    def edge_seeds(self) -> np.ndarray:
        """Flat indices of lung-mask voxels with a 6-neighbour outside it (computed on first use)."""
        if self._edge_seeds is None:
            inner = self.lung.copy()
            for axis in range(3):
                for shift in (1, -1):
                    inner &= np.roll(self.lung, shift, axis=axis)
            self._edge_seeds = np.flatnonzero(self.lung & ~inner)
        return self._edge_seeds

    def find_center(self, lesion: _Lesion, placed: list[_Placed], rng: np.random.Generator,
                    tries: int) -> Optional[np.ndarray]:
        """A continuous ``[k, j, i]`` index where ``lesion`` fits its position rule, or ``None``."""
        r = lesion.spec.diameter_mm / 2.0
        body = lesion.body.body_max_mm
        extent = lesion.body.extent_mm
        position = lesion.spec.position
        reach = 10.0 if position == "juxtapleural" else 6.0  # how far from the seed a centre may be (mm)
        half = reach + body + FREE_CLEARANCE_MM + 2.0
        render_half = extent + 3.0 + self.spacing[0]
        shape = np.asarray(self.array.shape)
        for _ in range(tries):
            pool = self.edge_seeds if position == "juxtapleural" else self.seeds
            seed = np.array(np.unravel_index(pool[rng.integers(len(pool))], self.array.shape), dtype=float)
            lo, hi = _box(seed, np.full(3, half), self.spacing, shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            host = self.array[box]
            pleural = _pleural_lung(host, self.lung[box], self.spacing)
            if not pleural.any():
                continue
            dist = ndimage.distance_transform_edt(pleural, sampling=self.spacing)
            axes = [(np.arange(a, b) * s) for a, b, s in zip(lo, hi, self.spacing)]
            zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
            seed_mm = seed * self.spacing
            ok = (zz - seed_mm[0]) ** 2 + (yy - seed_mm[1]) ** 2 + (xx - seed_mm[2]) ** 2 <= reach**2
            if position == "free":
                ok &= dist >= body + FREE_CLEARANCE_MM
            elif position == "juxtapleural":
                ok &= (dist >= max(r - 1.5, 0.5)) & (dist <= max(r - 0.25, 0.75))
            else:
                vessel = pleural & (host > VESSEL_MIN_HU)
                if not vessel.any():
                    continue
                vdist = ndimage.distance_transform_edt(~vessel, sampling=self.spacing)
                ok &= (np.abs(vdist - r) <= 0.5) & (dist >= body + 2.0)
            for c, rad in [(p.center_mm, p.extent_mm + extent + LESION_GAP_MM) for p in placed] + [
                    (c, rr + extent + AVOID_MARGIN_MM) for c, rr in self.avoid]:
                ok &= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 >= rad**2
            inside = [((ax >= m) & (ax <= (n - 1) * s - m))
                      for ax, m, n, s in zip(axes, np.full(3, render_half), shape, self.spacing)]
            ok &= inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
            cand = np.flatnonzero(ok)
            if len(cand):
                pick = np.array(np.unravel_index(cand[rng.integers(len(cand))], ok.shape), dtype=float)
                jitter = rng.uniform(-0.5, 0.5, 3) * np.minimum(1.0, 0.5 / self.spacing)
                return lo + pick + jitter
        return None


class _Scanner:
    """How the host scanner images an inserted object: slice integration, blur and noise (see the module docs)."""

    def __init__(self, host: _Host, slice_thickness_mm: Optional[float], psf_sigma_mm: tuple[float, float],
                 noise_corr_mm: float) -> None:
        self.host = host
        sp = host.spacing
        self.thickness = float(slice_thickness_mm or host.metadata.get("slice_thickness_mm") or sp[0])
        self.psf_sigma_mm = psf_sigma_mm
        self.psf = np.array([psf_sigma_mm[1], psf_sigma_mm[0], psf_sigma_mm[0]]) / sp
        self.noise_sigma = (0.0, noise_corr_mm / sp[1], noise_corr_mm / sp[2])

    def paint(self, out: np.ndarray, center: np.ndarray, extent_mm: float, fine_mm: float, render, noise_seed: int):
        """Blend the object ``render(z, y, x) -> (occupancy, HU)`` (local mm, k j i) centred at continuous index
        ``center`` into ``out`` (in place); return ``(box, host_before, occupancy, added_HU)`` of its box."""
        sp, thickness, psf_mm = self.host.spacing, self.thickness, self.psf_sigma_mm
        half = extent_mm + 3.0 * psf_mm[0] + np.array([thickness / 2 + 3 * psf_mm[1], 0.0, 0.0])
        lo, hi = _box(center, half, sp, out.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        thick = thickness > sp[0] * 1.05
        n = np.array([_odd(s / fine_mm) if i == 0 and thick else int(np.ceil(s / fine_mm)) for i, s in enumerate(sp)])
        sizes = n.copy()
        sizes[0] = _odd(thickness / (sp[0] / n[0])) if thick else n[0]
        axes = [((lo[a] + (np.arange((hi[a] - lo[a]) * n[a]) + 0.5) / n[a] - 0.5) - center[a]) * sp[a]
                for a in range(3)]
        zz, yy, xx = np.meshgrid(*[ax.astype(np.float32) for ax in axes], indexing="ij", sparse=True)
        alpha, hu = render(zz, yy, xx)
        occ = _integrate(alpha, n, sizes)
        mean_hu = _integrate(alpha * hu, n, sizes) / np.maximum(occ, 1e-6)
        h = out[box].copy()
        denser = mean_hu > h
        added = np.where(denser, occ * (mean_hu - h), 0.0)
        weight_b = np.clip(ndimage.gaussian_filter(np.where(denser, occ, 0.0), self.psf), 0.0, 1.0)
        object_b = ndimage.gaussian_filter(np.where(denser, occ * mean_hu, 0.0), self.psf)
        noise = ndimage.gaussian_filter(np.random.default_rng(noise_seed).standard_normal(h.shape), self.noise_sigma)
        noise /= max(float(noise.std()), 1e-6)
        noise_amp = self.host.noise_std * np.sqrt(np.clip(1.0 - (1.0 - weight_b) ** 2, 0.0, 1.0))
        out[box] = (1.0 - weight_b) * h + object_b + noise_amp * noise
        return box, h, occ, added


def _integrate(fine: np.ndarray, n: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Box-integrate a fine grid onto the host grid (``n`` fine samples per host voxel along each axis;
    ``sizes`` = box length in fine samples: ``n`` for the voxel itself, more for a thicker slice)."""
    out = fine
    for axis in range(3):
        if sizes[axis] == n[axis]:
            shp = list(out.shape)
            shp[axis:axis + 1] = [shp[axis] // n[axis], n[axis]]
            out = out.reshape(shp).mean(axis=axis + 1)
        else:
            out = ndimage.uniform_filter1d(out, int(sizes[axis]), axis=axis, mode="constant")
            out = np.take(out, np.arange(n[axis] // 2, out.shape[axis], n[axis]), axis=axis)
    return out


def _odd(x: float) -> int:
    n = max(1, int(np.ceil(x)))
    return n if n % 2 else n + 1


def insert_lesions(
    volume: CTVolume,
    lung_mask: np.ndarray,
    specs: Sequence[LesionSpec],
    rng: np.random.Generator,
    avoid: Sequence[tuple[Sequence[float], float]] = (),
    slice_thickness_mm: Optional[float] = None,
    psf_sigma_mm: tuple[float, float] = (0.6, 0.4),
    noise_corr_mm: float = 0.6,
    noise_std: Optional[float] = None,
    max_tries: int = 60,
) -> tuple[CTVolume, np.ndarray, list[InsertedLesion]]:
    """Insert synthetic lesions into a real chest CT (see the module docs for the model).

    Args:
        volume: host CT (HU, ``[k, j, i]``, any geometry).
        lung_mask: ``bool [k, j, i]`` lung mask of ``volume`` (vessels inside it; a margin into the wall is fine).
        specs: lesions to insert, in order; one that finds no place in ``max_tries`` seeds is skipped (logged).
        rng: placement generator (each lesion's shape, texture and noise come from ``spec.seed``).
        avoid: ``(center_lps, radius_mm)`` regions no lesion may come near (known findings).
        slice_thickness_mm: reconstructed slice thickness; default ``volume.metadata["slice_thickness_mm"]``
            or the k spacing.
        psf_sigma_mm: Gaussian point-spread sigma (in-plane, along k) in mm.
        noise_corr_mm: in-plane correlation sigma (mm) of the added noise.
        noise_std: host noise std in HU; default :func:`estimate_noise_std`.
        max_tries: random seeds tried per lesion.

    Returns:
        ``(new_volume, label_map uint16 [k, j, i], inserted)``; label ``n`` is ``inserted[n - 1]``.
    """
    host = _Host(volume, lung_mask, avoid, noise_std)
    sp = host.spacing
    scanner = _Scanner(host, slice_thickness_mm, psf_sigma_mm, noise_corr_mm)
    out = volume.array.astype(np.float32)
    labels = np.zeros(volume.array.shape, np.uint16)
    placed: list[_Placed] = []
    inserted: list[InsertedLesion] = []
    for spec in specs:
        lesion = _Lesion.from_spec(spec)
        center = host.find_center(lesion, placed, rng, max_tries)
        if center is None:
            log.warning("no place found for a %s %.1f mm %s lesion; skipped", spec.position, spec.diameter_mm,
                        spec.texture)
            continue
        extent = lesion.body.extent_mm
        box, h, occ, added = scanner.paint(out, center, extent, float(np.clip(spec.diameter_mm / 20.0, 0.15, 0.5)),
                                               lesion.render, spec.seed + 1)
        pleural = _pleural_lung(volume.array[box], host.lung[box], sp)
        mask = (occ >= 0.5) & (pleural | (added >= LABEL_MIN_ADDED_HU)) & (labels[box] == 0)
        if not mask.any():  # a thin lesion in thick slices: keep its densest voxels
            mask = (occ >= 0.5 * occ.max()) & (added > 0) & (labels[box] == 0)
        if not mask.any():
            log.warning("lesion of %.1f mm left no label on this grid; skipped", spec.diameter_mm)
            out[box] = h
            continue
        label = len(inserted) + 1
        labels[box][mask] = label
        idx = np.argwhere(mask).mean(axis=0) + [b.start for b in box]
        center_lps = volume.geometry.index_to_lps(idx[::-1])
        diameter = float(2.0 * (3.0 * mask.sum() * np.prod(sp) / (4.0 * np.pi)) ** (1 / 3))
        placed.append(_Placed(center_mm=center * sp, extent_mm=extent))
        inserted.append(InsertedLesion(tuple(float(v) for v in center_lps), diameter, spec, label))
    return dataclasses.replace(volume, array=_as_host_dtype(out, volume.array.dtype)), labels, inserted


def insert_distractors(
    volume: CTVolume,
    lung_mask: np.ndarray,
    n: int,
    rng: np.random.Generator,
    keep_out: Sequence[tuple[Sequence[float], float]] = (),
    slice_thickness_mm: Optional[float] = None,
    psf_sigma_mm: tuple[float, float] = (0.6, 0.4),
    noise_corr_mm: float = 0.6,
    noise_std: Optional[float] = None,
    max_tries: int = 30,
) -> CTVolume:
    """Insert ``n`` vessel-like tubes (``DISTRACTOR_*`` ranges; bent, tapering, often branching) into the aerated
    lung, imaged like inserted lesions (same partial-volume, blur and noise model) but with no label: training
    negatives meant to stop a network trained on few hosts from learning "anything this host lacks is a lesion"
    (measured in ``Resources/Models/EXPERIMENTS.md``, session 9: they made stage 1 miss more small lesions on
    other hosts).

    Args:
        volume: host CT (HU, ``[k, j, i]``).
        lung_mask: ``bool [k, j, i]`` lung mask of ``volume``; each tube is centred on aerated lung in it.
        n: tubes to insert; one that finds no place in ``max_tries`` seeds is skipped.
        rng: generator of shapes and placement.
        keep_out: ``(center_lps, radius_mm)`` balls no tube comes within ``AVOID_MARGIN_MM`` of (inserted
            lesions, known findings).
        slice_thickness_mm, psf_sigma_mm, noise_corr_mm, noise_std: as in :func:`insert_lesions`.

    Returns:
        The new volume (same geometry and dtype).
    """
    host = _Host(volume, lung_mask, keep_out, noise_std)
    scanner = _Scanner(host, slice_thickness_mm, psf_sigma_mm, noise_corr_mm)
    out = volume.array.astype(np.float32)
    for _ in range(n):
        vessel = _Vessel.random(rng)
        extent = vessel.extent_mm
        for _ in range(max_tries):
            seed = np.array(np.unravel_index(host.seeds[rng.integers(len(host.seeds))], out.shape), dtype=float)
            center = seed + rng.uniform(-0.5, 0.5, 3)
            if all(np.linalg.norm(center * host.spacing - c) >= r + extent + AVOID_MARGIN_MM for c, r in host.avoid):
                scanner.paint(out, center, extent, float(np.clip(vessel.r0.max() / 2, 0.3, 0.5)), vessel.render,
                              int(rng.integers(2**31 - 1)))
                break
        else:
            log.warning("no place found for a %.0f mm vessel-like distractor; skipped", 2 * extent)
    return dataclasses.replace(volume, array=_as_host_dtype(out, volume.array.dtype))


def _as_host_dtype(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    return out.astype(dtype)


# --------------------------------------------------------------------------------------------- gallery


@dataclass(frozen=True)
class GalleryItem:
    """One crop of the gallery: an axial slice through ``center_lps`` (LPS mm) of ``volume``."""

    title: str
    volume: CTVolume
    center_lps: tuple[float, float, float]
    diameter_mm: float


def save_example_grid(
    rows: Sequence[tuple[str, Sequence[GalleryItem]]],
    path: str | Path,
    overwrite: bool = False,
    window: tuple[float, float] = (-1350.0, 150.0),
    columns: int = 6,
) -> Path:
    """Write a PNG grid of axial crops (lung window) so that a person can judge realism.

    Each row is ``(row title, items)``; a crop spans ``max(30 mm, 2.5 × diameter)`` around the centre, shown
    at its true in-plane aspect (mm extents), on the axial slice nearest the centre.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = sum(max(1, -(-len(items) // columns)) for _, items in rows)
    fig, axes = plt.subplots(n_rows, columns, figsize=(1.7 * columns, 1.95 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    r = 0
    for row_title, items in rows:
        for n, item in enumerate(items):
            ax = axes[r + n // columns, n % columns]
            geo = item.volume.geometry
            i, j, k = geo.lps_to_index(np.asarray(item.center_lps, float))
            half = max(15.0, 1.25 * item.diameter_mm)
            sx, sy, _ = geo.spacing
            k = int(np.clip(round(k), 0, item.volume.array.shape[0] - 1))
            j0, j1 = int(round(j - half / sy)), int(round(j + half / sy)) + 1
            i0, i1 = int(round(i - half / sx)), int(round(i + half / sx)) + 1
            crop = item.volume.array[k, max(j0, 0):j1, max(i0, 0):i1]
            ax.imshow(crop, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest",
                      extent=(0, crop.shape[1] * sx, crop.shape[0] * sy, 0))
            ax.set_title(item.title, fontsize=6)
        ax0 = axes[r, 0]
        ax0.text(-0.08, 0.5, row_title, transform=ax0.transAxes, rotation=90, va="center", ha="right", fontsize=7)
        r += max(1, -(-len(items) // columns))
    fig.tight_layout(pad=0.3)
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
