"""NoduleDetectionTrainingLib: the NoduleDetectionTraining Slicer module's logic, without Qt.

* ``export``: scene → training data set (CT volumes + the nodules marked on them → ``ct/*.nrrd`` and
  ``annotations.csv`` in the shared layout, LPS mm). Uses MRML classes from ``slicer``.
* ``process``: the training configuration, and ``nodule-detection train`` run as a child process, followed
  through its log; Stop and resume. No ``slicer`` import.
* ``plot``: the live loss / validation-CPM curves as table, plot series and chart nodes. MRML only.

The model registry (the per-user models folder) is plain files and lives in the core:
``NoduleDetectionLib.registry``, shared with the NoduleDetection module.
"""
