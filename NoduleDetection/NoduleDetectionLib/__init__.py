"""NoduleDetectionLib: the pure core of the NoduleDetection 3D Slicer extension.

No ``slicer`` and no Qt import anywhere in this package: it runs from Slicer's Python, from a plain
Python environment, from the ``nodule-detection`` command line and from tests alike.

Data flows one way::

    io (read CT → CTVolume: HU array + LPS geometry) → preprocess (lung mask, crop, resample)
    → models (stage 1 U-net, stage 2 3D CNN) → detect (candidates → nodules in LPS mm)
    → writers (mrk.json, seg.nrrd, CSV, JSON, PNG)

Conventions (see ``geometry``): world coordinates are LPS millimetres; arrays are indexed
``[k, j, i]`` (z, y, x), as ``SimpleITK.GetArrayFromImage`` returns them; points and indices are
given in ``(x, y, z)`` / ``(i, j, k)`` order.
"""

__version__ = "0.1.0"
