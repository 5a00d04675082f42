"""MRML <-> files with real CT and real MRML (slicer-core): site cases voxel for voxel, the organ
ticks as the site's declaration, label map import as segments named, coloured and coded by the
SegViz terminology, the organ volume table, 3D."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from slicer_core_guard import require_mrml

slicer = require_mrml()
sitk = pytest.importorskip("SimpleITK")

from SegVizSlicerLib.compatibility import segment_terminology
from SegVizSlicerLib.segment_import import (
    ensure_conversion_rules,
    import_label_map,
    organ_volume_table,
    segment_voxel_counts,
    show_in_3d,
)
from SegVizSlicerLib.site_export import (
    Case,
    cases_from_scene,
    declaration_problems,
    match_segments,
    organ_of_segment_name,
    read_declaration,
    remove_case,
    replace_question,
    site_cases,
    write_case,
    write_declaration,
)
from SegVizSlicerLib.terminology import SegVizTerminology, organ_of_terminology
from SegVizSlicerLib.volume_nodes import (
    ijk_to_ras_array,
    image_from_volume_node,
    volume_node_from_image,
    write_volume_node,
)

from SegVizLogic.errors import SegVizInputError
from SegVizLogic.organs import organ_by_name

# TotalSegmentator ("fast", kidney split) label values of the example case -> SegViz organ.
TOTALSEG_VALUES = {"liver": 5, "spleen": 1, "pancreas": 7, "kidney_left": 3, "kidney_right": 2}
# Slicer's "3D Slicer General Anatomy list" display colours (Modules/Loadable/Terminologies/Resources/
# SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json at v5.10.0); the kidney's is its sides'.
GENERAL_ANATOMY_RGB = {"liver": (221, 130, 101), "spleen": (157, 108, 162), "pancreas": (249, 180, 111)}
GENERAL_ANATOMY_RGB["kidney"] = (185, 102, 83)


def _segviz_labels_from_totalseg(ts: np.ndarray) -> np.ndarray:
    """What a perfect SegViz model would predict for the example: TotalSegmentator values -> 1..4."""
    out = np.zeros(ts.shape, np.uint8)
    for name, value in TOTALSEG_VALUES.items():
        out[ts == value] = organ_by_name(name.split("_")[0]).label
    return out


def _totalseg_segmentation(scene, labels: sitk.Image, volume):
    """A segmentation node as TotalSegmentator leaves it: one segment per structure, named
    liver, spleen, pancreas, kidney_left, kidney_right (plus an unrelated one), no SegViz code."""
    array = sitk.GetArrayFromImage(labels)
    keep = dict(TOTALSEG_VALUES, aorta=52)
    indexed = np.zeros(array.shape, np.uint8)
    names = {}
    for index, (name, value) in enumerate(keep.items(), start=1):
        indexed[array == value] = index
        names[index] = name
    image = sitk.GetImageFromArray(indexed)
    image.CopyInformation(labels)
    labelmap = volume_node_from_image(scene, image, "ts labels", labelmap=True)
    segmentation = slicer.vtkMRMLSegmentationNode()
    segmentation.SetName("TotalSegmentator")
    scene.AddNode(segmentation)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    s = segmentation.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        s.GetNthSegment(i).SetName(names[s.GetNthSegment(i).GetLabelValue()])
    return segmentation


@pytest.fixture
def scene():
    ensure_conversion_rules()  # what the Slicer application does at startup
    return slicer.vtkMRMLScene()


@pytest.fixture
def example(scene, totalseg_example):
    ct_path, labels_path = totalseg_example
    ct = sitk.ReadImage(str(ct_path))
    labels = sitk.ReadImage(str(labels_path))
    volume = volume_node_from_image(scene, ct, "example_ct")
    return ct_path, labels_path, ct, labels, volume


def test_volume_node_has_the_files_geometry_in_ras(example):
    import nibabel as nib

    ct_path, _, ct, _, volume = example
    # nibabel's affine is voxel -> RAS straight from the NIfTI header: an independent reference.
    assert np.allclose(ijk_to_ras_array(volume), nib.load(str(ct_path)).affine, atol=1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(image_from_volume_node(volume)), sitk.GetArrayViewFromImage(ct))


def test_a_case_is_saved_voxel_for_voxel_with_the_ticked_organs_only(scene, example, tmp_path):
    ct_path, labels_path, _ct, labels, volume = example
    segmentation = _totalseg_segmentation(scene, labels, volume)
    case = Case(volume, segmentation)
    assert sorted(case.segment_organs.values()) == ["kidney", "kidney", "liver", "pancreas", "spleen"]  # not the aorta

    saved = write_case(case, tmp_path / "site", organs=["kidney", "liver"])

    assert (saved.name, saved.present, saved.declared) == ("example_ct", ("liver", "kidney"), ("liver", "kidney"))
    source_ct = sitk.ReadImage(str(ct_path))
    source_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    image = sitk.ReadImage(str(tmp_path / "site" / "images" / "example_ct.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "site" / "labels" / "example_ct.nii.gz"))
    for out in (image, written):
        assert out.GetSize() == source_ct.GetSize()
        assert np.allclose(out.GetOrigin(), source_ct.GetOrigin(), atol=1e-4)
        assert np.allclose(out.GetSpacing(), source_ct.GetSpacing(), atol=1e-6)
        assert np.allclose(out.GetDirection(), source_ct.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source_ct))
    expected = np.zeros(source_labels.shape, np.uint8)  # spleen and pancreas are not ticked: left out
    expected[source_labels == TOTALSEG_VALUES["liver"]] = 1
    expected[np.isin(source_labels, [TOTALSEG_VALUES["kidney_left"], TOTALSEG_VALUES["kidney_right"]])] = 4
    assert np.array_equal(sitk.GetArrayFromImage(written), expected)
    assert [c.name for c in site_cases(tmp_path / "site")] == ["example_ct"]
    assert not list((tmp_path / "site").glob(".writing-*")), "no staging folder is left behind"


def test_nothing_is_overwritten_without_asking_and_remove_deletes(scene, example, tmp_path):
    *_, labels, volume = example
    case = Case(volume, _totalseg_segmentation(scene, labels, volume))
    site = tmp_path / "site"
    assert replace_question(site, case.name) is None
    write_case(case, site, ["liver"])
    before = (site / "labels" / "example_ct.nii.gz").read_bytes()
    assert replace_question(site, case.name) == f"Case example_ct is already in the site folder {site}. Replace it?"
    with pytest.raises(SegVizInputError, match="already in the site folder"):
        write_case(case, site, ["liver", "spleen"])
    assert (site / "labels" / "example_ct.nii.gz").read_bytes() == before
    write_case(case, site, ["liver", "spleen"], replace=True)
    assert site_cases(site)[0].declared == ("liver", "spleen")
    remove_case(site, "example_ct")
    assert site_cases(site) == [] and not (site / "images" / "example_ct.nii.gz").exists()


def test_ticks_are_the_declaration_and_an_absent_organ_is_an_annotation(scene, example, tmp_path):
    """A ticked organ without a segment is saved as absent; the ticks (not the scene) decide
    what site.json declares; a case saved before an organ was ticked stops Join."""
    *_, volume = example
    liver_only = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(liver_only)
    liver_only.GetSegmentation().AddEmptySegment("liver", "Liver")
    site = tmp_path / "site"

    saved = write_case(Case(volume, liver_only, name="no-kidney"), site, ["liver", "kidney"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "labels" / "no-kidney.nii.gz")))
    assert saved.present == () and not labels.any(), "both organs declared, both absent: all zero"
    write_declaration(site, "site-a", ["kidney", "liver"])
    assert read_declaration(site) == ("site-a", ("liver", "kidney"))
    assert json.loads((site / "site.json").read_text(encoding="utf-8"))["labels"] == {"1": "liver", "4": "kidney"}
    assert declaration_problems(site, ["liver", "kidney"]) == [
        "liver is ticked but no case in the site folder contains it",
        "kidney is ticked but no case in the site folder contains it",
    ]
    assert declaration_problems(site, ["liver", "kidney", "spleen"])[0] == (
        "case no-kidney was saved before spleen was ticked: add it again with spleen annotated, or remove it"
    )
    assert declaration_problems(site, []) == [
        "no annotated organ: tick the organs this site annotated (liver, spleen, pancreas, kidney)"
    ]
    assert declaration_problems(tmp_path / "empty", ["liver"]) == [
        "the site folder has no case yet: add annotated cases first"
    ]
    with pytest.raises(SegVizInputError, match="no annotated organ"):
        write_case(Case(volume, liver_only), site, [])


def test_saved_site_passes_the_real_segviz_validate_site(scene, example, tmp_path):
    import subprocess

    from SegVizSlicerLib.job import child_environment, segviz_command

    *_, labels, volume = example
    write_case(Case(volume, _totalseg_segmentation(scene, labels, volume)), tmp_path / "site", ["liver", "kidney"])
    write_declaration(tmp_path / "site", "site-a", ["liver", "kidney"])
    assert declaration_problems(tmp_path / "site", ["liver", "kidney"]) == []
    done = subprocess.run(
        segviz_command(sys.executable) + ["validate-site", str(tmp_path / "site")],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        env=child_environment(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "valid" in done.stdout


def test_oblique_anisotropic_geometry_survives_the_round_trip(scene, tmp_path):
    import nibabel as nib

    image = sitk.GetImageFromArray(np.arange(7 * 9 * 11, dtype=np.int16).reshape(7, 9, 11))
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.5, 40.25, 7.0))
    rotation = sitk.VersorTransform((0.2, -0.4, 0.9), 0.6).GetMatrix()
    image.SetDirection(rotation)
    volume = volume_node_from_image(scene, image, "oblique")
    path = write_volume_node(volume, tmp_path / "oblique.nii.gz")
    back = sitk.ReadImage(str(path))
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(nib.load(str(path)).affine, ijk_to_ras_array(volume), atol=1e-4)


@pytest.mark.parametrize("split_kidney", [False, True])
def test_predicted_label_map_becomes_named_coloured_coded_segments(scene, example, split_kidney):
    _, _, _, labels, volume = example
    ts = sitk.GetArrayFromImage(labels)
    predicted = sitk.GetImageFromArray(_segviz_labels_from_totalseg(ts))
    predicted.CopyInformation(labels)

    segmentation = import_label_map(scene, predicted, reference_volume_node=volume, split_kidney=split_kidney)

    segments = segmentation.GetSegmentation()
    by_name = {
        segments.GetNthSegment(i).GetName(): segments.GetNthSegment(i) for i in range(segments.GetNumberOfSegments())
    }
    kidney_names = ["left kidney", "right kidney"] if split_kidney else ["kidney"]
    assert list(by_name) == ["liver", "spleen", "pancreas", *kidney_names]
    terminology = SegVizTerminology()
    for name, segment in by_name.items():
        side = name.split()[0] if " " in name else None
        organ = organ_by_name(name.split()[-1])
        # Colours come from the terminology: Slicer's General Anatomy colours, not SegVizLogic's.
        assert segment.GetColor() == pytest.approx(tuple(c / 255 for c in GENERAL_ANATOMY_RGB[organ.name]))
        entry = segment_terminology(segment)
        assert entry == terminology.organ(organ.name, side).entry
        assert entry.startswith("Segmentation category and type - SegViz~")
        assert organ_of_terminology(entry) == (organ, side)
        # Slicer's own parser accepts the string and reads the same codes.
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(entry, parsed)
        assert parsed.GetCategoryObject().GetCodeValue() == "123037004"
        assert parsed.GetTypeObject().GetCodeValue() == organ.snomed_code
        assert (
            parsed.GetTypeModifierObject().GetCodeValue() == {None: None, "left": "7771000", "right": "24028007"}[side]
        )

    counts = segment_voxel_counts(segmentation)
    expected = {"liver": (ts == 5).sum(), "spleen": (ts == 1).sum(), "pancreas": (ts == 7).sum()}
    if split_kidney:  # TotalSegmentator's own left/right split is the reference
        expected.update({"left kidney": (ts == 3).sum(), "right kidney": (ts == 2).sum()})
    else:
        expected["kidney"] = np.isin(ts, [2, 3]).sum()
    voxel_ml = np.prod(labels.GetSpacing()) / 1000.0
    assert {k: v[0] for k, v in counts.items()} == {k: int(v) for k, v in expected.items()}
    assert counts["liver"][1] == pytest.approx(expected["liver"] * voxel_ml)

    table = organ_volume_table(segmentation).GetTable()
    assert [table.GetValue(r, 0).ToString() for r in range(table.GetNumberOfRows())] == list(by_name)
    assert table.GetValue(0, 1).ToDouble() == pytest.approx(expected["liver"] * voxel_ml, abs=0.01)

    assert show_in_3d(segmentation)
    for segment in by_name.values():
        assert segment.GetRepresentation("Closed surface").GetNumberOfPoints() > 0


def test_refuses_a_label_that_is_no_organ(scene):
    image = sitk.GetImageFromArray(np.full((3, 3, 3), 9, np.uint8))
    with pytest.raises(ValueError, match="9"):
        import_label_map(scene, image)


def test_predicted_segments_are_matched_back_by_terminology_and_names(scene, example):
    _, _, _, labels, volume = example
    predicted = sitk.GetImageFromArray(_segviz_labels_from_totalseg(sitk.GetArrayFromImage(labels)))
    predicted.CopyInformation(labels)
    segmentation = import_label_map(scene, predicted, reference_volume_node=volume, split_kidney=True)
    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("Segment_1")  # renamed by a person: the SNOMED code still says liver
    assert sorted(match_segments(segmentation).values()) == ["kidney", "kidney", "liver", "pancreas", "spleen"]
    assert [c.segmentation_node for c in cases_from_scene(scene)] == [segmentation]
    assert organ_of_segment_name("Right Kidney") == "kidney"
    assert organ_of_segment_name("kidney_left") == "kidney"
    assert organ_of_segment_name("liver vessels") is None
    assert organ_of_segment_name("Kidneys") == "kidney"
