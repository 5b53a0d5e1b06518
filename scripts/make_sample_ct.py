"""Make the README demo's sample CT: a slab of LIDC-IDRI-0001 around its 24 mm nodule, 2× down-sampled in-plane.

Usage: python scripts/make_sample_ct.py ../shared/data/ct/LIDC-IDRI-0001 Resources/SampleData/LIDC-IDRI-0001-slab.nrrd

The slab keeps the whole body cross-section (the lung mask needs the air around the body), 60 slices
(150 mm) centred on the nodule, and 1.40625 mm pixels (2×2 block means of the original 0.703125 mm).
Source: LIDC-IDRI (TCIA), CC BY 3.0; see Resources/SampleData/README.md.
"""

import sys

import numpy as np
from NoduleDetectionLib.geometry import Geometry
from NoduleDetectionLib.io import read_ct, write_volume
from NoduleDetectionLib.volume import CTVolume

NODULE_LPS = (56.37, 86.36, -115.81)


def main(src: str, dst: str) -> None:
    volume = read_ct(src)
    k = int(round(volume.geometry.lps_to_index(NODULE_LPS)[2]))
    k0 = max(0, k - 30)
    slab = volume.array[k0 : k0 + 60].astype(np.float32)
    n, h, w = slab.shape
    small = slab[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    sx, sy, sz = volume.geometry.spacing
    # Voxel (0, 0) of the 2×2 grid sits at the centre of the first 2×2 block: old index (0.5, 0.5, k0).
    origin = volume.geometry.index_to_lps([0.5, 0.5, k0])
    geometry = Geometry((2 * sx, 2 * sy, sz), tuple(origin), volume.geometry.direction)
    out = CTVolume(np.round(small).astype(np.int16), geometry, name="LIDC-IDRI-0001-slab",
                   series_uid="LIDC-IDRI-0001-slab")
    write_volume(out, dst, overwrite=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
