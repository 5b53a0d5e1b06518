"""Static checks of the NoduleDetectionTraining Slicer module that need no Slicer: its classes, every ``self.ui``
name against its ``.ui`` file, the scene links of its node selectors, its CMake packaging and icon.

The module file imports ``qt`` and ``slicer.ScriptedLoadableModule`` (Slicer only), so it is read with ``ast``.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "NoduleDetectionTraining"
MODULE_FILE = MODULE_DIR / "NoduleDetectionTraining.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "NoduleDetectionTraining.ui"


def test_module_has_slicer_classes():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["NoduleDetectionTraining"] == ["ScriptedLoadableModule"]
    assert classes["NoduleDetectionTrainingWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["NoduleDetectionTrainingLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["NoduleDetectionTrainingTest"] == ["ScriptedLoadableModuleTest"]


def test_every_ui_name_used_exists_in_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget uses no self.ui names?"
    names = {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}
    missing = used - names
    assert not missing, f"used in NoduleDetectionTraining.py but not in its .ui file: {sorted(missing)}"


def test_ui_file_declares_its_widgets_and_links_selectors_to_the_scene():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "NoduleDetectionTraining"
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used_classes if c.startswith(("ctk", "qMRML"))} <= declared
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")
                 and w.get("class").endswith("NodeComboBox")}
    link = ("mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)")
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if (c.findtext("signal"), c.findtext("slot")) == link}
    assert len(selectors) == 3 and selectors <= connected


def test_cmake_installs_the_module_and_the_top_level_adds_it():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^\s+NoduleDetectionTrainingLib/\*\.py\s*$", cmake, flags=re.M)
    assert (MODULE_DIR / "NoduleDetectionTrainingLib" / "__init__.py").is_file()
    listed = {e.replace("${MODULE_NAME}", "NoduleDetectionTraining")
              for e in re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, flags=re.M)}
    for entry in listed - {"NoduleDetectionTrainingLib/*.py"}:
        assert (MODULE_DIR / entry).is_file(), f"CMakeLists.txt lists {entry}, which does not exist"
    assert {"NoduleDetectionTraining.py", "Resources/UI/NoduleDetectionTraining.ui",
            "Resources/Icons/NoduleDetectionTraining.png"} <= listed
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert "add_subdirectory(NoduleDetectionTraining)" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def test_module_icon_is_128_png():
    image = pytest.importorskip("PIL.Image")
    with image.open(MODULE_DIR / "Resources" / "Icons" / "NoduleDetectionTraining.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
