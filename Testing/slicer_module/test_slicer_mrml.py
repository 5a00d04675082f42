"""MRML <-> files with real CT and real MRML (slicer-core): site export voxel for voxel, label map
import as named/coloured/SNOMED-tagged segments, the organ volume table, 3D, and the apply path."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from conftest import TOTALSEG_VALUES
from SegVizSlicerLib import workflows
from SegVizSlicerLib.job import InferenceJob
from SegVizSlicerLib.panel_state import InferenceState
from SegVizSlicerLib.segment_import import (
    ensure_conversion_rules,
    import_label_map,
    organ_of_terminology,
    organ_volume_table,
    segment_terminology,
    segment_voxel_counts,
    show_in_3d,
    terminology_entry,
)
from SegVizSlicerLib.site_export import (
    Case,
    cases_from_scene,
    export_site,
    match_segments,
    organ_of_segment_name,
)
from SegVizSlicerLib.volume_nodes import (
    ijk_to_ras_array,
    image_from_volume_node,
    volume_node_from_image,
    write_volume_node,
)

from SegVizLogic.organs import organ_by_name


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


def test_site_export_matches_the_source_voxel_for_voxel(scene, example, tmp_path):
    ct_path, labels_path, _ct, labels, volume = example
    segmentation = _totalseg_segmentation(scene, labels, volume)
    case = Case(volume, segmentation)
    assert sorted(case.segment_organs.values()) == ["kidney", "kidney", "liver", "pancreas", "spleen"]  # not the aorta

    site_json = export_site([case], tmp_path / "site", "site-a", organs=["kidney", "liver"])

    assert json.loads(site_json.read_text()) == {
        "name": "site-a",
        "organs": ["liver", "kidney"],
        "labels": {"1": "liver", "4": "kidney"},
    }
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
    expected = np.zeros(source_labels.shape, np.uint8)
    expected[source_labels == TOTALSEG_VALUES["liver"]] = 1
    expected[np.isin(source_labels, [TOTALSEG_VALUES["kidney_left"], TOTALSEG_VALUES["kidney_right"]])] = 4
    assert np.array_equal(sitk.GetArrayFromImage(written), expected)

    # Unticked organs are not exported; a second export drops cases no longer listed.
    (tmp_path / "site" / "images" / "old_case.nii.gz").write_bytes(b"")
    export_site([case], tmp_path / "site", "site-a")
    assert json.loads(site_json.read_text())["organs"] == ["liver", "spleen", "pancreas", "kidney"]
    assert sorted(p.name for p in (tmp_path / "site" / "images").iterdir()) == ["example_ct.nii.gz"]


def test_exported_site_passes_the_real_segviz_validate_site(scene, example, tmp_path):
    import subprocess

    from SegVizSlicerLib.job import child_environment, segviz_command

    _, _, _, labels, volume = example
    export_site(
        [Case(volume, _totalseg_segmentation(scene, labels, volume))], tmp_path / "site", "site-a", ["liver", "kidney"]
    )
    done = subprocess.run(
        segviz_command(sys.executable) + ["validate-site", str(tmp_path / "site")],
        capture_output=True,
        check=False,
        text=True,
        env=child_environment(),
        timeout=300,
    )
    if done.returncode != 0 and "invalid choice" in done.stderr:
        pytest.skip("segviz validate-site is not available")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "valid" in done.stdout


def test_export_refuses_a_site_without_annotated_organ(scene, example, tmp_path):
    from SegVizLogic.errors import SegVizInputError

    *_, volume = example
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    assert segmentation.GetSegmentation().AddEmptySegment("tumour", "tumour")
    with pytest.raises(SegVizInputError, match="no annotated organ"):
        export_site([Case(volume, segmentation)], tmp_path, "site-a")
    with pytest.raises(SegVizInputError, match="no case"):
        export_site([], tmp_path, "site-a")
    # Ticking an organ that a case has no segment for would teach "background": refused.
    assert segmentation.GetSegmentation().AddEmptySegment("liver", "Liver")
    with pytest.raises(SegVizInputError, match="no kidney segment"):
        export_site([Case(volume, segmentation)], tmp_path, "site-a", ["liver", "kidney"])
    export_site([Case(volume, segmentation)], tmp_path, "site-a", ["liver"])  # an empty liver segment is fine


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
    for name, segment in by_name.items():
        side = name.split()[0] if " " in name else None
        organ = organ_by_name(name.split()[-1])
        assert segment.GetColor() == pytest.approx(organ.colour_float)
        entry = segment_terminology(segment)
        assert entry == terminology_entry(organ, side)
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


def test_apply_path_with_a_child_that_writes_the_label_map(scene, example, tmp_path):
    """The apply path end to end, with a stand-in child (the real CLI needs a trained bundle)."""
    _, labels_path, _, _labels, volume = example
    output = tmp_path / "organs.nii.gz"
    code = textwrap.dedent(f"""
        import json, numpy as np, SimpleITK as sitk
        ts = sitk.ReadImage({str(labels_path)!r}); a = sitk.GetArrayFromImage(ts)
        out = np.zeros(a.shape, np.uint8)
        for v, o in ((5, 1), (1, 2), (7, 3), (3, 4), (2, 4)):
            out[a == v] = o
        img = sitk.GetImageFromArray(out); img.CopyInformation(ts)
        print(json.dumps({{"event": "progress", "stage": "sliding window", "current": 1, "total": 1}}), flush=True)
        sitk.WriteImage(img, {str(output)!r})
        print(json.dumps({{"event": "done", "outputs": {{"labels": {str(output)!r}}}}}), flush=True)
    """)
    job = InferenceJob([sys.executable, "-c", code], output=output)
    job.start()
    deadline = time.monotonic() + 60
    while job.output_ready is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    job.poll()
    segmentation, table = workflows.load_inference_result(job, volume, split_kidney=True)
    assert job.status.state == InferenceState.DONE
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 5
    assert table.GetTable().GetNumberOfRows() == 5


@pytest.mark.slow
def test_apply_a_real_model_bundle_with_the_real_cli(scene, example, tmp_path):
    """Set SEGVIZ_TEST_MODEL to a *.segviz bundle: the real `segviz infer` runs on the real CT."""
    model = os.environ.get("SEGVIZ_TEST_MODEL")
    if not model or not Path(model).is_file():
        pytest.skip("SEGVIZ_TEST_MODEL is not set to a model bundle")
    _, _, ct, _, volume = example
    job = workflows.start_inference(volume, model, tmp_path, device="cpu", python=sys.executable)
    assert (Path(job.process.cwd) / "input.nii.gz").is_file()
    deadline = time.monotonic() + 1200
    while job.output_ready is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.2)
    job.poll()
    assert job.output_ready, (job.status.message, job.process.stderr_tail[-5:])
    written = sitk.ReadImage(str(job.output))
    assert written.GetSize() == ct.GetSize() and np.allclose(written.GetDirection(), ct.GetDirection())
    segmentation, table = workflows.load_inference_result(job, volume, split_kidney=True)
    names = {
        segmentation.GetSegmentation().GetNthSegment(i).GetName()
        for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
    }
    assert names <= {"liver", "spleen", "pancreas", "left kidney", "right kidney"}
    assert table.GetTable().GetNumberOfRows() == len(names)
    assert job.status.state == InferenceState.DONE
