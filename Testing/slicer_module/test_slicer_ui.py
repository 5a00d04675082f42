"""The .ui, the module source and the extension packaging agree with each other (no Slicer needed)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "Resources" / "UI" / "SegVizSlicer.ui"
MODULE = REPO / "SegVizSlicer" / "SegVizSlicer.py"


@pytest.fixture(scope="module")
def ui_tree() -> ET.Element:
    return ET.parse(UI).getroot()


@pytest.fixture(scope="module")
def module_source() -> str:
    return MODULE.read_text(encoding="utf-8")


def _widgets(root: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_every_widget_the_module_uses_exists_in_the_ui(ui_tree, module_source):
    used = set(re.findall(r"self\.ui\.(\w+)", module_source))
    widgets = _widgets(ui_tree)
    assert used, "the module references no widget?"
    assert sorted(used - set(widgets)) == []


def test_widget_names_are_unique_and_classes_declared(ui_tree):
    names = [w.get("name") for w in ui_tree.iter("widget")]
    assert len(names) == len(set(names))
    declared = {c.findtext("class") for c in ui_tree.iter("customwidget")}
    custom = {cls for cls in _widgets(ui_tree).values() if not cls.startswith("Q")}
    assert custom <= declared


def _parameter_fields(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SegVizSlicerParameterNode":
            return {
                stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body if isinstance(stmt, ast.AnnAssign)
            }
    raise AssertionError("no SegVizSlicerParameterNode")


def test_parameter_node_fields_and_gui_bindings_agree(ui_tree, module_source):
    fields = _parameter_fields(module_source)
    bound = {}
    for widget in ui_tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert set(bound) == set(fields), "every parameter has one widget and every bound widget a parameter"
    # The connector parameterNodeWrapper will pick for each (widget class, type) pair exists.
    for name, cls in bound.items():
        kind = fields[name]
        if cls == "ctkPathLineEdit":
            assert "Path" in kind
        elif cls == "qMRMLNodeComboBox":
            assert kind.startswith("vtkMRML")
        elif cls == "QComboBox":
            assert "Choice" in kind
        elif cls == "QCheckBox":
            assert kind == "bool"
        elif cls == "QLineEdit":
            assert kind == "str"
        else:
            raise AssertionError(f"no connector for {cls}")


def test_device_choices_match_the_combo_items(ui_tree, module_source):
    choice = re.search(r"device: Annotated\[str, Choice\((\[.*?\])\)\]", module_source)
    combo = next(w for w in ui_tree.iter("widget") if w.get("name") == "deviceComboBox")
    items = [item.find("property/string").text for item in combo.findall("item")]
    assert ast.literal_eval(choice.group(1)) == items == ["auto", "cpu", "cuda"]


def test_mrml_combos_get_the_scene(ui_tree):
    combos = {n for n, cls in _widgets(ui_tree).items() if cls == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in ui_tree.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    assert combos and combos == connected


def test_user_visible_strings_are_translatable(module_source):
    # Texts put on widgets go through _(): no bare string literal assigned to .text / .toolTip.
    bare = re.findall(r"\.(?:text|toolTip)\s*=\s*[\"']", module_source)
    assert bare == []


def test_module_source_compiles_and_has_the_four_classes(module_source):
    tree = ast.parse(module_source)
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["SegVizSlicer"]
    assert "ScriptedLoadableModuleWidget" in classes["SegVizSlicerWidget"]
    # The Logic lives in SegVizSlicerLib (importable without Qt, tested headless) and is imported here.
    assert "SegVizSlicerLogic" not in classes
    assert "from SegVizSlicerLib.logic import SegVizSlicerLogic" in module_source
    assert "ScriptedLoadableModuleTest" in classes["SegVizSlicerTest"]
    # Heavy dependencies are never imported at module import time.
    top_imports = {
        a.name.split(".")[0]
        for n in tree.body
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])
    }
    assert not top_imports & {"torch", "monai", "flwr"}
    assert "pip_install" not in "".join(
        ast.unparse(n) for n in tree.body if not isinstance(n, (ast.ClassDef, ast.FunctionDef))
    )


def test_headless_library_imports_no_qt():
    for path in (REPO / "SegVizSlicer" / "SegVizSlicerLib").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"qt", "ctk", "PythonQt", "PySide6"}, path.name


# ---------------------------------------------------------------- extension packaging


def test_s4ext_has_every_field():
    fields = {}
    for line in (REPO / "SegVizSlicer.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    for key in (
        "scm",
        "scmurl",
        "scmrevision",
        "depends",
        "build_subdirectory",
        "homepage",
        "contributors",
        "category",
        "iconurl",
        "status",
        "description",
        "screenshoturls",
        "enabled",
    ):
        assert fields.get(key), key
    assert fields["category"] == "Segmentation" and fields["depends"] == "PyTorch"
    assert fields["screenshoturls"].endswith("docs/slicer_panel_drawing.png")


def test_cmake_lists_name_files_that_exist():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for word in (
        "cmake_minimum_required",
        "project(SegVizSlicer)",
        'EXTENSION_CATEGORY "Segmentation"',
        "EXTENSION_DEPENDS",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(SegVizSlicer)",
        "Slicer_EXTENSION_GENERATE_CONFIG",
        "Slicer_EXTENSION_CPACK",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert word in top, word
    module = (REPO / "SegVizSlicer" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert (
        "slicerMacroBuildScriptedModule" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    )
    assert "SegVizLogic/*.py" in module
    for resource in (
        "Resources/Icons/${MODULE_NAME}.png",
        "Resources/UI/${MODULE_NAME}.ui",
        "Resources/Terminology/SegmentationCategoryTypeModifier-SegViz.term.json",
        "Resources/requirements.txt",
    ):
        assert resource in module
        assert (REPO / resource.replace("${MODULE_NAME}", "SegVizSlicer")).is_file()
    assert (REPO / "SegVizSlicer" / "Testing" / "CMakeLists.txt").is_file()


def test_requirements_cover_the_features():
    from SegVizSlicerLib.dependencies import FEATURE_PACKAGES, read_requirements

    requirements = read_requirements(REPO / "Resources" / "requirements.txt")
    for packages in FEATURE_PACKAGES.values():
        assert set(packages) <= set(requirements)
    assert str(requirements["flwr"].specifier) == "<1.43,>=1.42"


# The catalog entry schema (Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json,
# "additionalProperties": false): its properties, and the ones it requires.
CATALOG_PROPERTIES = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "build_subdirectory",
    "enabled",
    "tier",
}


def test_extensions_index_entry_is_valid_and_agrees_with_the_metadata():
    import json

    entry = json.loads((REPO / "SegVizSlicer.json").read_text(encoding="utf-8"))
    assert set(entry) <= CATALOG_PROPERTIES and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    s4ext = dict(
        line.split(" ", 1)
        for line in (REPO / "SegVizSlicer.s4ext").read_text(encoding="utf-8").splitlines()
        if line[:1].isalpha()
    )
    assert entry["category"] == s4ext["category"] and f'EXTENSION_CATEGORY "{entry["category"]}"' in top
    assert entry["build_dependencies"] == s4ext["depends"].split() == ["PyTorch"]
    assert 'EXTENSION_DEPENDS "PyTorch"' in top
    assert entry["scm_url"] == s4ext["scmurl"] and entry["scm_revision"] == s4ext["scmrevision"]
    # Every URL points at a file of this repository's layout (raw or blob on the main branch).
    repository = entry["scm_url"].removesuffix(".git").removeprefix("https://github.com/")
    urls = re.findall(r"https://\S+?(?=[\s\")]|$)", top + "\n" + "\n".join(s4ext.values()))
    assert urls
    for url in urls:
        if url.endswith(".git"):
            continue
        prefixes = (
            f"https://raw.githubusercontent.com/{repository}/main/",
            f"https://github.com/{repository}/blob/main/",
        )
        assert url.startswith(prefixes), url
        path = url.split("/main/", 1)[1]
        assert (REPO / path).is_file(), url
    assert "drawing" in s4ext["screenshoturls"] and "drawing of the panel" in top
