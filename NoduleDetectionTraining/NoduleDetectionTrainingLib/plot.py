"""Live training curves in the scene: loss and validation CPM as Slicer plot nodes, filled from the log.

Nodes (made once per scene, found again by name, so a second training reuses them):

* table ``<title> loss`` (``vtkMRMLTableNode``): columns ``iteration``, ``loss``, ``stage``;
* table ``<title> validation``: columns ``iteration``, ``val_cpm``;
* one ``vtkMRMLPlotSeriesNode`` per table (loss: line; validation CPM: line with markers);
* chart ``<title>`` (``vtkMRMLPlotChartNode``) showing both; Slicer shows it with
  ``slicer.modules.plots.logic().ShowChartInLayout(chart)``.

``iteration`` runs on across the phases: stage 1 step ``s`` is ``s``, a step of stage 1's refinement (a config's
``stage1_refine``) or of stage 2 is ``s`` plus the steps of the phases before it; a validation record is placed at
the iteration of the last training record before it.

MRML only (no Qt, no ``slicer.util``): tested with slicer-core.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import slicer
import vtk

#: The training phases in their order (``NoduleDetectionLib.train.PHASES``, not imported: it needs PyTorch).
_PHASES = ("stage1", "stage1_refine", "stage2")
_LOSS_COLUMNS = (("iteration", vtk.vtkDoubleArray), ("loss", vtk.vtkDoubleArray), ("stage", vtk.vtkStringArray))
_VALIDATION_COLUMNS = (("iteration", vtk.vtkDoubleArray), ("val_cpm", vtk.vtkDoubleArray))


def _node(scene: Any, class_name: str, name: str) -> Any:
    node = scene.GetFirstNode(name, class_name, False, True)
    return node if node is not None else scene.AddNewNodeByClass(class_name, name)


def _reset_table(table_node: Any, columns: tuple) -> None:
    table = vtk.vtkTable()
    for name, array_class in columns:
        array = array_class()
        array.SetName(name)
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)


class TrainingPlot:
    """The training-curve nodes of a scene, and their update from log records.

    Example::

        plot = TrainingPlot(slicer.mrmlScene)
        plot.clear()
        plot.add_records(run.poll())    # from a timer while the training runs
    """

    def __init__(self, scene: Any, title: str = "Nodule detection training") -> None:
        self.loss_table = _node(scene, "vtkMRMLTableNode", f"{title} loss")
        self.validation_table = _node(scene, "vtkMRMLTableNode", f"{title} validation")
        self.loss_series = _node(scene, "vtkMRMLPlotSeriesNode", f"{title}: loss")
        self.validation_series = _node(scene, "vtkMRMLPlotSeriesNode", f"{title}: validation CPM")
        self.chart = _node(scene, "vtkMRMLPlotChartNode", title)
        for series, table, column, color in (
            (self.loss_series, self.loss_table, "loss", (0.1, 0.4, 0.8)),
            (self.validation_series, self.validation_table, "val_cpm", (0.9, 0.4, 0.1)),
        ):
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("iteration")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*color)
            if not self.chart.HasPlotSeriesNodeID(series.GetID()):
                self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.loss_series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        self.validation_series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        self.chart.SetTitle(title)
        self.chart.SetXAxisTitle("iteration (stage 1, then stage 2)")
        self.chart.SetYAxisTitle("loss / validation CPM")
        self.clear()

    def clear(self) -> None:
        """Empty both tables (a new training starts)."""
        _reset_table(self.loss_table, _LOSS_COLUMNS)
        _reset_table(self.validation_table, _VALIDATION_COLUMNS)
        self._phase_steps: dict[str, int] = {}
        self._iteration = 0.0

    def add_records(self, records: Iterable[dict]) -> int:
        """Append log records (``{"stage", "step", "steps", "loss", "val_cpm", ...}``) to the tables; returns
        the number of rows added. Records of other stages (``done``) and non-numeric values are skipped."""
        added = 0
        loss_table, validation_table = self.loss_table.GetTable(), self.validation_table.GetTable()
        for record in records:
            stage = record.get("stage")
            if stage in _PHASES:
                step = float(record.get("step", 0))
                self._phase_steps[stage] = max(self._phase_steps.get(stage, 0), int(record.get("steps") or step))
                before = _PHASES[:_PHASES.index(stage)]
                self._iteration = sum(self._phase_steps.get(p, 0) for p in before) + step
                loss = record.get("loss")
                if isinstance(loss, (int, float)) and math.isfinite(loss):
                    loss_table.GetColumnByName("iteration").InsertNextValue(self._iteration)
                    loss_table.GetColumnByName("loss").InsertNextValue(float(loss))
                    loss_table.GetColumnByName("stage").InsertNextValue(stage)
                    added += 1
            cpm = record.get("val_cpm")
            if isinstance(cpm, (int, float)) and math.isfinite(cpm):
                validation_table.GetColumnByName("iteration").InsertNextValue(self._iteration)
                validation_table.GetColumnByName("val_cpm").InsertNextValue(float(cpm))
                added += 1
        if added:
            for node in (self.loss_table, self.validation_table):
                node.GetTable().Modified()
                node.Modified()
        return added
