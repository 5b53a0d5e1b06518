"""NoduleDetectionLogicLib: the 3D Slicer scene side of NoduleDetection, without Qt.

* ``scene``: MRML volume node ↔ ``CTVolume``; a detection result → markups, segmentation and table nodes.
  Imports ``slicer`` MRML classes, ``vtk``, numpy and ``NoduleDetectionLib``; it runs inside the Slicer
  application, in plain Python with ``slicer-core`` (real MRML, no GUI) and under pytest.
* ``background``: run a detection in a worker thread with progress and cancel, for a GUI that polls it.
* ``parameters``: the module's settings as stored in its MRML parameter node (saved with the scene).

The Slicer module ``NoduleDetection.py`` (Widget = GUI only, Logic = thin wrapper) delegates to this package.
"""
