"""Run a detection in a worker thread so that Slicer's GUI stays responsive.

Slicer's Qt event loop and its Python share one thread. The detector (torch, numpy, scipy) releases the GIL
for its heavy work, so running it in a ``threading.Thread`` keeps the GUI live; the GUI polls the task with
a ``qt.QTimer`` to move its progress bar, and applies the result to the scene on the main thread (MRML is
not thread-safe: the worker never touches the scene). Cancel sets a flag that the detector's ``cancel``
callback reads between steps, so the run stops with ``detect.Cancelled`` and nothing reaches the scene.

No Qt and no ``slicer`` import here.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]


class BackgroundTask:
    """``work(progress, cancel)`` run once in a daemon thread; every method is safe from any thread.

    Example::

        task = BackgroundTask(lambda progress, cancel: detector.detect(volume, progress=progress, cancel=cancel))
        task.start()
        ...                       # from a timer: task.status() -> ("stage 1", 0.4), task.done
        result = task.result()    # once task.done: the return value, or the worker's exception re-raised
    """

    def __init__(self, work: Callable[[Progress, Cancel], Any]) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._status: tuple[str, float] = ("waiting", 0.0)
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="NoduleDetection", daemon=True)

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            self._status = (str(stage), min(max(float(fraction), 0.0), 1.0))

    def _run(self) -> None:
        try:
            self._result = self._work(self._progress, self._cancel.is_set)
        except BaseException as exc:  # handed to the GUI thread by result()
            self._error = exc

    def start(self) -> BackgroundTask:
        """Start the worker thread; returns ``self``."""
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next ``cancel()`` check."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        """True once ``cancel()`` was called."""
        return self._cancel.is_set()

    def status(self) -> tuple[str, float]:
        """Latest ``(stage, fraction 0..1)`` reported by the work."""
        with self._lock:
            return self._status

    @property
    def done(self) -> bool:
        """True when the work has returned or raised."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the work ends (or ``timeout`` seconds pass); returns ``done``."""
        self._thread.join(timeout)
        return self.done

    def result(self) -> Any:
        """The work's return value; re-raises its exception. Only valid once ``done``."""
        if not self.done:
            raise RuntimeError("the background task has not finished")
        if self._error is not None:
            raise self._error
        return self._result
