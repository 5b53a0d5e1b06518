"""A candidate's measured features, and the small linear model over them that rates it beside stage 2's CNN.

Stage 2's CNN learnt the host scans it was trained on, and ranks the other hosts' vessel branch points and dots
above small nodules (``Resources/Models/EXPERIMENTS.md``, sessions 8-11). The features here are measured, not
learnt, so they mean the same in every scan: what stage 1 and stage 2 said, the region's size and mean intensity,
the Hessian's shape at its centre (a ball, a tube or a plate), and what surrounds it: sampled on two spheres around
the centre, how much of each is dense tissue, how often two opposite directions both are (a vessel runs through),
and how much lies outside the lungs (the pleura). A logistic model over them (``FeatureModel``; ``fit``) is fitted
on training scans' candidates; ``calibrate`` chooses how much it weighs in a finding's probability
(``detect.feature_prior``).

All measurements are on the working grid ``[k, j, i]`` of ``preprocess.prepare`` (normalised intensities, LPS
geometry), in mm where they have a unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from .blobs import SCALES_MM, ShapeFilter, hessian_entries, symmetric_eigenvalues
from .datasets import Finding
from .errors import ModelError
from .evaluate import match_radius_mm
from .regions import region_counts, region_sums

#: The features, in the order of a feature vector (``candidate_features``).
FEATURE_NAMES = (
    "stage1_logit", "stage2_logit", "log_dot", "log_volume_mm3", "mean_hu", "hessian_mid_ratio",
    "hessian_low_ratio", "dense_near", "dense_far", "dense_through", "outside_lung_far", "outside_lung_wide",
    "blob_proposal", "ray_through", "ray_most", "ray_mean",
)
#: Tissue at least this dense (HU) inside the lungs counts as dense: vessels, airway walls, fissures, pleura (the
#: spheres around a candidate here; stage 2's tissue negatives, ``train``; large outlines' growth, ``detect``).
DENSE_HU = -500.0
#: Directions sampled on each sphere: ``SPHERE_DIRECTIONS // 2`` spread over a half sphere and their opposites.
SPHERE_DIRECTIONS = 64
#: The spheres' radii beyond the candidate's own equivalent radius (mm): near, far and wide.
SHELL_MARGINS_MM = (1.5, 3.5, 8.0)
#: The rays from a candidate's edge: sampled at these distances beyond its equivalent radius (mm).
RAY_MARGINS_MM = (1.0, 2.0, 3.0, 4.0, 5.0)


def sphere_directions(n: int = SPHERE_DIRECTIONS) -> np.ndarray:
    """``n`` (even) unit vectors ``(n, 3)``: ``n // 2`` on a Fibonacci spiral over the half sphere ``z > 0`` and
    then their opposites, so that direction ``d + n // 2`` is ``-d``."""
    m = n // 2
    z = 1.0 - (np.arange(m) + 0.5) / m
    phi = np.arange(m) * np.pi * (3.0 - np.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    half = np.stack([z, r * np.sin(phi), r * np.cos(phi)], axis=1)
    return np.concatenate([half, -half])


def _logit(p: np.ndarray, limit: float = 15.0) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1.0 - 1e-7)
    return np.clip(np.log(p / (1.0 - p)), -limit, limit)


def candidate_features(image: np.ndarray, lung: np.ndarray, shapes: ShapeFilter,
                       regions: np.ndarray, ids: Sequence[int], centres_kji: np.ndarray,
                       stage1_logit: np.ndarray, stage2: np.ndarray, dot: np.ndarray,
                       blob: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """The ``FEATURE_NAMES`` of candidates, ``float64 (N, len(FEATURE_NAMES))``.

    ``image``, ``lung``: the working grid's normalised image and lung mask ``[k, j, i]``; ``shapes``: its
    ``ShapeFilter`` (which holds the grid's voxel size); ``regions``: the candidates' label map there, ``ids``
    their regions; ``centres_kji``: their centres ``(N, 3)`` in working-grid index units ``(k, j, i)``;
    ``stage1_logit``: each region's highest stage 1 logit; ``stage2``: stage 2 probabilities; ``dot``: each
    region's highest dot filter value (``ShapeFilter.region_dotness``); ``blob``: whether a candidate is a blob
    proposal; ``hu_window``: the HU range the image's 0-1 spans.
    """
    ids = np.asarray(ids, int).reshape(-1)
    n = ids.size
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    spacing_kji = shapes.spacing_kji
    lo, hi = hu_window
    voxels = region_counts(regions, ids)
    volume = voxels * float(np.prod(spacing_kji))
    mean_hu = lo + (hi - lo) * region_sums(image, regions, ids) / np.maximum(voxels, 1.0)
    mid, low = _hessian_ratios(shapes, np.round(centres_kji).astype(int).T)
    radius = np.clip((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0), 1.5, 15.0)
    dirs = sphere_directions()
    half = len(dirs) // 2

    def sphere(volume_kji: np.ndarray, margin: float, order: int, mode: str) -> np.ndarray:
        """``volume_kji`` sampled on each candidate's sphere ``margin`` mm beyond its radius: ``(N, directions)``."""
        points = centres_kji[:, None, :] + (radius[:, None, None] + margin) * dirs[None] / spacing_kji
        return ndimage.map_coordinates(volume_kji, points.reshape(-1, 3).T, order=order, mode=mode).reshape(n, -1)

    near, far, wide = SHELL_MARGINS_MM
    dense_level = (DENSE_HU - lo) / (hi - lo)
    dense_near, dense_far = (sphere(image, m, 1, "nearest") >= dense_level for m in (near, far))
    lung_u8 = lung.astype(np.uint8)
    inside_far, inside_wide = (sphere(lung_u8, m, 0, "constant") > 0 for m in (far, wide))
    through = (dense_far[:, :half] & dense_far[:, half:]).mean(axis=1)
    ray_through, ray_most, ray_mean = _rays(image, spacing_kji, centres_kji, radius, dirs)
    return np.stack([
        np.asarray(stage1_logit, float), _logit(stage2), np.log(np.asarray(dot, float) + 0.005),
        np.log(np.maximum(volume, 1e-3)), mean_hu, mid, low, dense_near.mean(axis=1), dense_far.mean(axis=1), through,
        1.0 - inside_far.mean(axis=1), 1.0 - inside_wide.mean(axis=1), np.asarray(blob, float),
        ray_through, ray_most, ray_mean,
    ], axis=1)


def _rays(image: np.ndarray, spacing_kji: np.ndarray, centres_kji: np.ndarray, radius: np.ndarray,
          dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How far a candidate's own contrast carries on along rays from its edge (``RAY_MARGINS_MM`` beyond its
    equivalent ``radius`` mm, each of ``dirs``): a ray's mean intensity above the background (the median over the
    rays' far ends, at most the centre's value), relative to the centre's contrast above it. Returns, per
    candidate, the highest over opposite pairs of the lower of the two (a vessel running through: near 1), the
    highest over rays (anything attached) and the mean over rays (how crowded it sits)."""
    n, half = len(centres_kji), len(dirs) // 2
    steps = radius[:, None, None] + np.asarray(RAY_MARGINS_MM)[None, None, :]  # (N, 1, S)
    points = centres_kji[:, None, None, :] + steps[..., None] * dirs[None, :, None, :] / spacing_kji
    values = ndimage.map_coordinates(image, points.reshape(-1, 3).T, order=1, mode="nearest").reshape(
        n, len(dirs), len(RAY_MARGINS_MM))
    centre = ndimage.map_coordinates(image, centres_kji.T, order=1, mode="nearest")
    background = np.minimum(np.median(values[:, :, -1], axis=1), centre)
    contrast = np.maximum(centre - background, 0.02)
    ray = np.clip((values.mean(axis=2) - background[:, None]) / contrast[:, None], -1.0, 2.0)
    return np.minimum(ray[:, :half], ray[:, half:]).max(axis=1), ray.max(axis=1), ray.mean(axis=1)


def _hessian_ratios(shapes: ShapeFilter, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At the voxels ``idx`` ``int (3, N)`` of a ``ShapeFilter``'s grid, the Hessian of its top-hat image at the scale
    (``blobs.SCALES_MM``) of the most negative eigenvalue ``λ1``: ``λ2 / λ1`` and ``λ3 / λ1`` (``λ1 ≤ λ2 ≤ λ3``), both
    near 1 at a ball's centre; ``λ3 / λ1`` near 0 on a tube, both near 0 on a plate. Zeros where ``λ1 ≥ 0``."""
    idx = np.clip(idx, 0, np.array(shapes.tophat.shape)[:, None] - 1)
    best = np.zeros((3, idx.shape[1]))
    for s_mm, g in zip(SCALES_MM, shapes.smoothed()):
        h = hessian_entries(idx, g, shapes.spacing_kji, s_mm)
        smallest, largest = symmetric_eigenvalues(h)
        middle = h[0] + h[1] + h[2] - smallest - largest
        stronger = smallest < best[0]
        best[:, stronger] = np.array([smallest, middle, largest])[:, stronger]
    neg = best[0] < 0
    safe = np.where(neg, best[0], -1.0)
    mid = np.where(neg, np.clip(best[1] / safe, -1.0, 1.0), 0.0)
    low = np.where(neg, np.clip(best[2] / safe, -1.0, 1.0), 0.0)
    return mid, low


def candidate_labels(findings: Sequence[Finding], scans: Sequence[str], centers_lps: np.ndarray) -> np.ndarray:
    """Training labels of candidates (scan ``scans[n]``, centre ``centers_lps[n]`` LPS mm) by the evaluator's hit
    rule (``evaluate.match_radius_mm``): 1 within a nodule's radius, -1 (left out) within an excluded finding's or a
    mass's, else 0."""
    centers_lps = np.asarray(centers_lps, float).reshape(-1, 3)
    labels = np.zeros(len(centers_lps), int)
    ignore = np.zeros(len(centers_lps), bool)
    scans = np.asarray(scans)
    for f in findings:
        near = (scans == f.seriesuid) & (
            np.sum((centers_lps - np.asarray(f.center_lps)) ** 2, axis=1) < match_radius_mm(f.diameter_mm) ** 2)
        if f.status == "nodule":
            labels[near] = 1
        else:
            ignore |= near
    labels[ignore & (labels == 0)] = -1
    return labels


@dataclass
class FeatureModel:
    """A logistic model over standardised ``FEATURE_NAMES``: ``sigmoid(coef · (x - center) / scale + bias)``."""

    center: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    bias: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """The model's probability for feature vectors ``(N, len(FEATURE_NAMES))``; ``float64 (N,)``."""
        z = (np.asarray(features, float) - self.center) / self.scale @ self.coef + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_config(self) -> dict:
        """The model as plain lists (``Stage2Config.features``)."""
        return {"names": list(FEATURE_NAMES), "center": self.center.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "bias": float(self.bias)}

    @classmethod
    def from_config(cls, data: dict) -> FeatureModel:
        """From ``to_config`` output; a model over other features than ``FEATURE_NAMES`` is a ``ModelError``."""
        if tuple(data.get("names", ())) != FEATURE_NAMES:
            raise ModelError(f"the model's candidate features {data.get('names')} are not this version's "
                             f"{list(FEATURE_NAMES)}")
        return cls(np.array(data["center"], float), np.array(data["scale"], float), np.array(data["coef"], float),
                   float(data["bias"]))


def fit(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3) -> FeatureModel:
    """Fit a ``FeatureModel`` to candidates' features ``(N, F)`` and labels (1 nodule, 0 not; ``candidate_labels``,
    others left out): each feature standardised by its median and interquartile range, positives and negatives
    weighted to count alike (half the loss each), ``l2`` the ridge penalty on the coefficients."""
    keep = labels >= 0
    x, y = np.asarray(features, float)[keep], (np.asarray(labels)[keep] == 1).astype(float)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("fitting candidate features needs both nodule hits and false candidates")
    center = np.median(x, axis=0)
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    scale = np.where(q75 - q25 > 1e-6, q75 - q25, np.maximum(x.std(axis=0), 1.0))
    z = (x - center) / scale
    w = np.where(y == 1, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, bias = theta[:-1], theta[-1]
        m = z @ coef + bias
        p = 1.0 / (1.0 + np.exp(-m))
        value = np.sum(w * (np.logaddexp(0.0, m) - y * m)) + 0.5 * l2 * coef @ coef
        r = w * (p - y)
        return float(value), np.concatenate([z.T @ r + l2 * coef, [r.sum()]])

    theta = optimize.minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return FeatureModel(center, scale, theta[:-1], float(theta[-1]))
