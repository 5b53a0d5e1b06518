"""Static checks of the Slicer module that need no Slicer: the module file's classes, its ``.ui`` names, and
the extension's packaging (CMake lists every Python file, metadata complete, icon 128×128).

The module file imports ``qt`` and ``slicer.ScriptedLoadableModule``, which exist only inside Slicer, so it is
read with ``ast``, never imported.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "NoduleDetection"
MODULE_FILE = MODULE_DIR / "NoduleDetection.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "NoduleDetection.ui"


def _ui_widget_names() -> set[str]:
    return {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_module_has_slicer_classes():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["NoduleDetection"] == ["ScriptedLoadableModule"]
    assert classes["NoduleDetectionWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["NoduleDetectionLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["NoduleDetectionTest"] == ["ScriptedLoadableModuleTest"]


def test_every_ui_name_used_exists_in_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget uses no self.ui names?"
    missing = used - _ui_widget_names()
    assert not missing, f"used in NoduleDetection.py but not in NoduleDetection.ui: {sorted(missing)}"


def test_ui_file_is_designer_xml_with_scene_connections():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "NoduleDetection"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used_classes if c.startswith(("ctk", "qMRML"))} <= declared
    node_selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    link = ("mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)")
    connections = root.iter("connection")
    connected = {c.findtext("receiver") for c in connections if (c.findtext("signal"), c.findtext("slot")) == link}
    assert node_selectors and node_selectors <= connected


def test_cmake_installs_packages_and_resources():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for package in ("NoduleDetectionLib", "NoduleDetectionLogicLib"):
        assert re.search(rf"^\s+{package}/\*\.py\s*$", cmake, flags=re.M), f"{package} is not installed"
        assert (MODULE_DIR / package / "__init__.py").is_file()
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, flags=re.M))
    listed = {entry.replace("${MODULE_NAME}", "NoduleDetection") for entry in listed}
    assert {"NoduleDetection.py", "Resources/UI/NoduleDetection.ui", "Resources/Icons/NoduleDetection.png"} <= listed
    for entry in listed - {f"{p}/*.py" for p in ("NoduleDetectionLib", "NoduleDetectionLogicLib")}:
        assert (MODULE_DIR / entry).is_file(), f"CMakeLists.txt lists {entry}, which does not exist"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake


def test_extension_metadata_complete():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        match = re.search(rf'set\(EXTENSION_{key} "([^"]+)"\)', cmake)
        assert match and match.group(1).strip(), f"EXTENSION_{key} is missing or empty"
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    s4ext = dict(
        line.split(" ", 1) for line in (ROOT / "NoduleDetection.s4ext").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    for key in ("scm", "scmurl", "depends", "homepage", "category", "iconurl", "description", "screenshoturls"):
        assert s4ext.get(key, "").strip(), f"{key} missing in NoduleDetection.s4ext"
    assert s4ext["depends"].strip() == "PyTorch"


def test_module_icon_is_128_png():
    image = pytest.importorskip("PIL.Image")
    with image.open(MODULE_DIR / "Resources" / "Icons" / "NoduleDetection.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
