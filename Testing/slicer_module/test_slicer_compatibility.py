"""Each Slicer-version and platform difference, one function each, with a test per branch."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from SegVizSlicerLib import compatibility
from SegVizSlicerLib.compatibility import (
    child_process_options,
    graceful_stop_signal,
    install_python_packages,
    unsupported_reason,
)
from SegVizSlicerLib.logic import scripted_logic_base, temporary_root

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "slicer_version, python, words",
    [
        ((5, 8), (3, 9, 10), ["Slicer 5.8", "Python 3.9", "3D Slicer 5.10 or later (Python 3.12)"]),
        ((5, 6), (3, 9), ["Slicer 5.6", "Python >= 3.11"]),
        (None, (3, 10, 4), ["Python >= 3.11", "this Python is 3.10"]),
    ],
)
def test_an_unsupported_slicer_gets_one_clear_sentence(slicer_version, python, words):
    reason = unsupported_reason(slicer_version, python)
    assert reason is not None and "\n" not in reason
    for word in words:
        assert word in reason


@pytest.mark.parametrize("slicer_version, python", [((5, 10), (3, 12, 10)), ((5, 13), (3, 12)), (None, (3, 11, 0))])
def test_supported_slicer_and_python_pass(slicer_version, python):
    assert unsupported_reason(slicer_version, python) is None


def test_the_supported_release_is_stated_in_the_guide_metadata_and_module():
    stated = compatibility.SUPPORTED_RELEASES
    assert stated in (REPO / "docs" / "USER_GUIDE.md").read_text(encoding="utf-8")
    assert stated in (REPO / "SegVizSlicer.s4ext").read_text(encoding="utf-8")
    assert stated in (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "SUPPORTED_RELEASES" in (REPO / "SegVizSlicer" / "SegVizSlicer.py").read_text(encoding="utf-8")


def test_compatibility_parses_with_the_python_of_an_old_slicer():
    """The module must import on Slicer 5.8's Python 3.9 to say "too old" instead of crashing."""
    import ast

    source = (REPO / "SegVizSlicer" / "SegVizSlicerLib" / "compatibility.py").read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 9))
    module_source = (REPO / "SegVizSlicer" / "SegVizSlicer.py").read_text(encoding="utf-8")
    ast.parse(module_source, feature_version=(3, 9))


def test_terminology_through_the_api_and_through_the_tag_on_a_real_segment():
    from slicer_core_guard import require_mrml

    slicer = require_mrml()
    entry = "Segmentation category and type - SegViz~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~~^^~^^"
    segment = slicer.vtkSegment()
    compatibility.set_segment_terminology(segment, entry)  # Slicer >= 5.10: SetTerminology
    assert compatibility.segment_terminology(segment) == entry
    # Before 5.10 only the tag exists: the same storage, read with the two-argument GetTag.
    other = slicer.vtkSegment()
    compatibility._set_terminology_tag(other, entry)
    assert compatibility._terminology_tag(other) == entry == other.GetTerminology()
    with pytest.raises(TypeError):  # what the module called before: one argument
        other.GetTag("TerminologyEntry")


def test_windows_children_get_a_process_group_and_no_console_window():
    assert child_process_options("nt") == {"creationflags": 0x00000200 | 0x08000000}
    assert child_process_options("posix") == {"start_new_session": True}
    assert graceful_stop_signal("nt") == 1  # CTRL_BREAK_EVENT
    assert graceful_stop_signal("posix") == signal.SIGTERM


def test_packages_go_through_pip_ensure_where_slicer_has_it_else_pip_install():
    calls = []
    newer = SimpleNamespace(
        packaging=SimpleNamespace(pip_ensure=lambda reqs, **kw: calls.append(("pip_ensure", reqs, kw))),
        util=SimpleNamespace(pip_install=lambda reqs: calls.append(("pip_install", reqs))),
    )
    install_python_packages(["monai>=1.4,<2"], newer, "SegViz")
    assert calls == [("pip_ensure", ["monai>=1.4,<2"], {"requester": "SegViz", "prompt_install": False})]
    calls.clear()
    slicer_5_10 = SimpleNamespace(util=newer.util)
    install_python_packages(["flwr>=1.42,<1.43"], slicer_5_10, "SegViz")
    assert calls == [("pip_install", ["flwr>=1.42,<1.43"])]
    calls.clear()
    install_python_packages([], slicer_5_10, "SegViz")
    assert calls == []


def test_logic_base_and_temporary_folder_inside_and_outside_the_application(tmp_path):
    assert scripted_logic_base(SimpleNamespace()) is object  # bare MRML: no application, no Qt
    assert scripted_logic_base() is object  # slicer-core here has no slicer.ScriptedLoadableModule
    app = SimpleNamespace(app=SimpleNamespace(temporaryPath=str(tmp_path)))
    assert temporary_root(app) == tmp_path / "SegViz"
    assert temporary_root(SimpleNamespace()) == Path(tempfile.gettempdir()) / "SegViz"


def test_terminologies_logic_is_the_applications_inside_slicer_else_a_bare_one():
    from slicer_core_guard import require_mrml

    slicer = require_mrml()
    from SegVizSlicerLib.terminology import terminologies_logic

    shared = object()
    inside = SimpleNamespace(modules=SimpleNamespace(terminologies=SimpleNamespace(logic=lambda: shared)))
    assert terminologies_logic(inside) is shared
    bare = terminologies_logic(slicer)
    assert bare.IsA("vtkSlicerTerminologiesModuleLogic") and terminologies_logic(slicer) is bare


def test_term_json_codes_are_the_organ_schema_and_colours_slicers_general_anatomy():
    from SegVizLogic.organs import KIDNEY_SIDE_MODIFIERS, ORGANS

    term = json.loads(
        (REPO / "Resources" / "Terminology" / "SegmentationCategoryTypeModifier-SegViz.term.json").read_text(
            encoding="utf-8"
        )
    )
    assert term["SegmentationCategoryTypeContextName"] == "Segmentation category and type - SegViz"
    [category] = term["SegmentationCodes"]["Category"]
    assert (category["CodingSchemeDesignator"], category["CodeValue"]) == ("SCT", "123037004")
    types = {t["CodeValue"]: t for t in category["Type"]}
    assert list(types) == [o.snomed_code for o in ORGANS]
    # Slicer's "3D Slicer General Anatomy list" at v5.10.0 (the kidney's colour is its sides').
    general_anatomy = {"liver": [221, 130, 101], "spleen": [157, 108, 162], "pancreas": [249, 180, 111]}
    general_anatomy["kidney"] = [185, 102, 83]
    for organ in ORGANS:
        entry = types[organ.snomed_code]
        assert (entry["CodeMeaning"], entry["3dSlicerLabel"]) == (organ.snomed_meaning, organ.name)
        assert entry["recommendedDisplayRGBValue"] == general_anatomy[organ.name]
    sides = {m["CodeValue"]: m["3dSlicerLabel"] for m in types["64033007"]["Modifier"]}
    assert sides == {code[1]: f"{side} kidney" for side, code in KIDNEY_SIDE_MODIFIERS.items()}


def test_terminology_loads_through_slicers_logic_and_reads_back():
    from slicer_core_guard import require_mrml

    slicer = require_mrml()
    from SegVizSlicerLib.terminology import SegVizTerminology, organ_of_terminology

    terminology = SegVizTerminology(logic=slicer.vtkSlicerTerminologiesModuleLogic())
    right = terminology.organ("kidney", "right")
    assert (right.name, [round(c * 255) for c in right.colour]) == ("right kidney", [185, 102, 83])
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(right.entry, parsed)
    assert parsed.GetTerminologyContextName() == "Segmentation category and type - SegViz"
    assert parsed.GetTypeObject().GetCodeValue() == "64033007"
    assert parsed.GetTypeModifierObject().GetCodeValue() == "24028007"
    assert organ_of_terminology(right.entry)[1] == "right"
    assert organ_of_terminology(terminology.organ("pancreas").entry)[0].name == "pancreas"
    with pytest.raises(ValueError, match="liver"):
        terminology.organ("liver", "left")
    broken = Path(tempfile.mkdtemp()) / "broken.term.json"
    broken.write_text("{}", encoding="utf-8")
    with pytest.raises(RuntimeError, match="broken.term.json"):
        SegVizTerminology(logic=slicer.vtkSlicerTerminologiesModuleLogic(), path=broken)


def test_the_module_imports_only_inside_slicer():
    """SegVizSlicer.py needs the Slicer application's qt, ctk and ScriptedLoadableModule: without
    them this is a clear skip; SegVizSlicerLib (its Logic and controllers) is tested headless."""
    import importlib.util

    absent = []
    for name in ("qt", "ctk", "slicer.ScriptedLoadableModule"):
        try:
            if importlib.util.find_spec(name) is None:
                absent.append(name)
        except ImportError:
            absent.append(name)
    if absent:
        pytest.skip(f"SegVizSlicer.py needs the Slicer application's {', '.join(absent)}, absent here")
    sys.path.insert(0, str(REPO / "SegVizSlicer"))
    module = importlib.import_module("SegVizSlicer")
    assert module.UNSUPPORTED is None
    assert issubclass(module.SegVizSlicerLogic, module.ScriptedLoadableModuleTest.__mro__[-1])


def test_the_mrml_guard_skips_when_slicer_is_only_a_folder(monkeypatch, tmp_path):
    """A folder named ``slicer`` imports as a namespace package; the guard looks for real MRML."""
    import importlib

    from slicer_core_guard import require_mrml

    (tmp_path / "slicer").mkdir()
    monkeypatch.delitem(sys.modules, "slicer", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    namespace = importlib.import_module("slicer")
    assert not hasattr(namespace, "vtkMRMLScene")
    with pytest.raises(pytest.skip.Exception, match="not the slicer-core MRML wheel"):
        require_mrml()
