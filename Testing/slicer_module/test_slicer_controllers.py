"""The panel's decisions, made by the plain-Python controllers the widget only wires: button states,
what a poll of a job shows, at most one dialog per failure, settings read and written, the model
summary from the manifest. With real child processes and real MRML (slicer-core)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from slicer_core_guard import require_mrml

slicer = require_mrml()
sitk = pytest.importorskip("SimpleITK")

from SegVizSlicerLib.dependencies import install_plan, missing_packages, status_line
from SegVizSlicerLib.federation_controller import (
    CLOSE_QUESTION,
    FederationController,
    JoinRequest,
    format_duration,
    ticked_organs,
)
from SegVizSlicerLib.inference_controller import InferenceController, inference_input
from SegVizSlicerLib.job import InferenceJob, child_environment
from SegVizSlicerLib.model_summary import describe_model
from SegVizSlicerLib.panel_settings import PanelSettings
from SegVizSlicerLib.panel_state import FederationState, InferenceState
from SegVizSlicerLib.segment_import import ensure_conversion_rules
from SegVizSlicerLib.site_export import Case, write_case
from SegVizSlicerLib.volume_nodes import volume_node_from_image
from SegVizSlicerLib.workflows import load_inference_result

from SegVizLogic.bundle_manifest import MANIFEST_MEMBER

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def scene():
    ensure_conversion_rules()
    return slicer.vtkMRMLScene()


def _ct(shape=(12, 20, 24)) -> sitk.Image:
    array = np.full(shape, -1000, np.int16)
    array[2:10, 4:16, 4:20] = 40  # a body
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((-20.0, 10.0, 5.0))
    return image


class ScriptRunner:
    """Starts a real child running a script in place of ``segviz infer`` (the runner seam a warm
    worker will also use)."""

    def __init__(self, script: str) -> None:
        self.script = textwrap.dedent(script)

    def start(self, request):
        code = self.script.format(input=str(request.input.path), output=str(request.output))
        job = InferenceJob([sys.executable, "-c", code], output=request.output, cwd=request.input.work_dir)
        job.start()
        return job


WRITES_LIVER = """
    import json, numpy as np, SimpleITK as sitk
    ct = sitk.ReadImage({input!r})
    labels = (sitk.GetArrayFromImage(ct) > 0).astype(np.uint8)
    out = sitk.GetImageFromArray(labels); out.CopyInformation(ct)
    print(json.dumps({{"event": "progress", "stage": "sliding window", "current": 1, "total": 2}}), flush=True)
    sitk.WriteImage(out, {output!r})
    print(json.dumps({{"event": "done", "outputs": {{"labels": {output!r}}}}}), flush=True)
"""


def _poll_all(controller, load, timeout=60.0):
    polls = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        polls.append(controller.poll(load))
        if not polls[-1].active:
            for _ in range(3):  # the timer ticks on: nothing may repeat
                polls.append(controller.poll(load))
            return polls
        time.sleep(0.05)
    raise AssertionError(f"still running: {polls[-1]}")


def test_apply_button_says_what_is_missing(scene, tmp_path):
    controller = InferenceController(tmp_path)
    volume = volume_node_from_image(scene, _ct(), "ct")
    assert controller.button(None, False).tooltip == "Choose a model bundle and an input volume"
    assert not controller.button(volume, False).enabled
    assert controller.button(None, True).tooltip == "Choose the CT volume to segment"
    ready = controller.button(volume, True)
    assert (ready.text, ready.enabled) == ("Apply", True)


def test_apply_copies_an_unsaved_volume_loads_the_result_once_and_removes_its_files(scene, tmp_path):
    volume = volume_node_from_image(scene, _ct(), "unsaved ct")
    model = tmp_path / "m.segviz"
    model.write_bytes(b"a bundle")
    controller = InferenceController(tmp_path / "temp", ScriptRunner(WRITES_LIVER))
    request = controller.start(volume, model)
    assert request.input.copied and request.input.path.parent == request.input.work_dir
    assert request.input.work_dir.parent == tmp_path / "temp"
    assert controller.button(volume, True).text == "Cancel"

    loads = []

    def load(job):
        loads.append(load_inference_result(job, volume))
        return loads[-1]

    polls = _poll_all(controller, load)
    assert len(loads) == 1 and [p.result for p in polls if p.result is not None] == [loads[0]]
    segmentation, table = loads[0]
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "liver"
    assert table.GetTable().GetValue(0, 1).ToDouble() == pytest.approx(8 * 12 * 16 * 1.5 * 1.5 * 3.0 / 1000, abs=0.01)
    assert polls[-1].progress == (0, 100, 100) and polls[-1].status == "1 organ segments loaded"
    assert all(p.dialog is None for p in polls)
    assert not request.input.work_dir.exists(), "the copy and the outputs are removed once loaded"


def test_a_failure_shows_one_dialog_however_often_the_timer_ticks(scene, tmp_path):
    volume = volume_node_from_image(scene, _ct(), "ct")
    model = tmp_path / "m.segviz"
    model.write_bytes(b"x")
    failing = ScriptRunner("""
        import json, sys
        print(json.dumps({{"event": "error", "message": "{input}: not a CT (no HU)"}}), flush=True)
        sys.exit(2)
    """)
    controller = InferenceController(tmp_path / "temp", failing)
    request = controller.start(volume, model)
    polls = _poll_all(controller, lambda job: None)
    dialogs = [p.dialog for p in polls if p.dialog]
    assert dialogs == [f"Applying the SegViz model failed:\n{request.input.path}: not a CT (no HU)"]
    assert polls[-1].status.startswith("Failed: ") and polls[-1].progress == (0, 100, 0)
    assert controller.button(volume, True).enabled and not request.input.work_dir.exists()

    # A result that cannot be loaded is one failure too, with the loader's reason.
    controller = InferenceController(tmp_path / "temp", ScriptRunner(WRITES_LIVER))
    controller.start(volume, model)

    def broken(job):
        raise RuntimeError("the segmented volume is no longer in the scene")

    dialogs = [p.dialog for p in _poll_all(controller, broken) if p.dialog]
    assert dialogs == [
        "Applying the SegViz model failed:\nthe result could not be loaded: the segmented volume is no longer in the scene"
    ]


def test_cancel_ends_the_job_quietly_and_removes_its_files(scene, tmp_path):
    volume = volume_node_from_image(scene, _ct(), "ct")
    model = tmp_path / "m.segviz"
    model.write_bytes(b"x")
    controller = InferenceController(tmp_path / "temp", ScriptRunner("import time; time.sleep(600)"))
    request = controller.start(volume, model)
    with pytest.raises(RuntimeError, match="already running"):
        controller.start(volume, model)
    controller.cancel()
    polls = _poll_all(controller, lambda job: None)
    assert controller.job.status.state == InferenceState.CANCELLED
    assert all(p.dialog is None for p in polls) and not request.input.work_dir.exists()


def test_the_input_is_the_volumes_own_file_its_dicom_series_or_a_copy(scene, tmp_path):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(_ct(), str(path))
    volume = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(volume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume)

    own = inference_input(volume, tmp_path / "temp")
    assert (own.path, own.copied, own.series_uid) == (path, False, None)

    series = tmp_path / "dicom" / "1.2.3"
    series.mkdir(parents=True)
    files = [series / f"{i}.dcm" for i in range(3)]
    for file in files:
        file.write_bytes(b"DICM")
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.1 1.2.3.2 1.2.3.3")
    asked = []

    def database(uids):
        asked.append(uids)
        return [str(f) for f in files], "1.2.3"

    dicom = inference_input(volume, tmp_path / "temp", database)
    assert (dicom.path, dicom.series_uid, dicom.copied) == (series, "1.2.3", False)
    assert asked == [["1.2.3.1", "1.2.3.2", "1.2.3.3"]]

    volume.StorableModified()  # edited in Slicer: the files no longer hold what is shown
    copied = inference_input(volume, tmp_path / "temp", database)
    assert copied.copied and copied.path.name == "input.nii.gz"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(copied.path))), sitk.GetArrayFromImage(_ct()))

    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="harden"):
        inference_input(volume, tmp_path / "temp")


# ---------------------------------------------------------------- federation


def _site_with_a_case(scene, tmp_path) -> Path:
    volume = volume_node_from_image(scene, _ct(), "case1")
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = (sitk.GetArrayFromImage(_ct()) > 0).astype(np.uint8)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(_ct())
    labelmap = volume_node_from_image(scene, image, "labels", labelmap=True)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("Liver")
    site = tmp_path / "site"
    write_case(Case(volume, segmentation), site, ["liver"])
    return site


FAKE_JOIN = """#!{python}
import json, pathlib, signal, sys, time
pathlib.Path({argv_file!r}).write_text(json.dumps(sys.argv[1:]))
def emit(**e):
    print(json.dumps(e), flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
emit(event="stage", stage="connect", message="connecting")
time.sleep(0.3)
emit(event="connected", superlink="127.0.0.1:9093")
time.sleep(0.3)
emit(event="round_started", round=1, rounds=3)
emit(event="epoch", epoch=1, epochs=2, loss=0.5)
time.sleep(1.2)
emit(event="update_sent", round=1, num_examples=1)
emit(event="round_finished", round=1, rounds=3, metrics={{"dice": {{"liver": 0.8125}}}})
time.sleep(0.3)
if {fail!r}:
    print("error: the coordinator refused this site's reply", file=sys.stderr, flush=True)
    sys.exit(1)
time.sleep(600)
"""


def _fake_python(tmp_path, fail=False) -> tuple[str, Path]:
    argv_file = tmp_path / "argv.json"
    script = tmp_path / ("fake-python-fail" if fail else "fake-python")
    script.write_text(FAKE_JOIN.format(python=sys.executable, argv_file=str(argv_file), fail=fail), encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), argv_file


def _request(site, **changes) -> JoinRequest:
    fields = {"superlink": "127.0.0.1:9093", "site_dir": site, "site_name": "site-a", "organs": ("liver",)}
    fields.update({"insecure": True, **changes})
    return JoinRequest(**fields)


def test_join_button_follows_the_ticks_and_says_what_is_missing(tmp_path):
    controller = FederationController()
    empty = JoinRequest(superlink="", site_dir=None, site_name="", organs=())
    view = controller.join_button(empty)
    assert not view.enabled and view.tooltip == (
        "To join: enter the SuperLink address (HOST:PORT) your coordinator gave you; give this site's name; "
        "choose the site folder; tick the organs this site annotated; "
        "choose the federation's root certificate (ca.crt)"
    )
    assert controller.join_button(_request(tmp_path)).enabled
    assert not controller.join_button(_request(tmp_path, organs=())).enabled  # unticking disables Join
    missing_key = _request(tmp_path, node_key=str(tmp_path / "node.key"))
    assert (
        controller.join_button(missing_key).tooltip == f"To join: the node key {tmp_path / 'node.key'} does not exist"
    )
    assert ticked_organs({"kidney": True, "liver": True, "spleen": False}) == ("liver", "kidney")
    assert controller.review_button(False).enabled is False and controller.review_button(True).enabled
    assert not controller.add_case_button(_request(tmp_path), False).enabled
    assert controller.add_case_button(_request(tmp_path), True, "Add to my site").text == "Add to my site"


@pytest.mark.skipif(os.name == "nt", reason="POSIX executable script")
def test_join_poll_leave_with_a_real_child(scene, tmp_path):
    site = _site_with_a_case(scene, tmp_path)
    python, argv_file = _fake_python(tmp_path)
    controller = FederationController(python=python, connect_timeout=None)
    with pytest.raises(ValueError, match="spleen is ticked but no case"):
        controller.join(_request(site, organs=("liver", "spleen")))
    assert not (site / "site.json").exists(), "nothing is written when Join is refused"
    assert controller.close_question() is None

    controller.join(_request(site, share_final_batchnorm=True, trust_file=str(argv_file.parent / "fake-python")))
    assert json.loads((site / "site.json").read_text(encoding="utf-8"))["organs"] == ["liver"]
    polls, seen = [], set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        poll = controller.poll()
        polls.append(poll)
        seen.add(poll.connection)
        if poll.global_dice != "–" and "last round took" in poll.round_time:
            break
        time.sleep(0.05)
    argv = json.loads(argv_file.read_text(encoding="utf-8"))
    assert argv[2:5] == ["federation", "join", "--superlink"] and "--share-final-batchnorm" in argv
    assert argv[argv.index("--trust") + 1] == str(argv_file.parent / "fake-python")
    assert "Connecting to 127.0.0.1:9093…" in seen and "Connected, training" in seen
    assert "Connected, waiting for the coordinator to start a round" in seen
    assert any(p.epoch == "Local epoch 1 of 2, loss 0.5000" for p in polls)
    assert any(p.round_time.endswith("so far") for p in polls)
    last = polls[-1]
    assert (last.round, last.global_dice, last.progress) == ("Round 1 of 3", "liver 0.812", (0, 3, 1))
    assert last.round_time.startswith("last round took ") and last.round_time.endswith(" s")
    logged = [line for p in polls for line in p.log_lines]
    assert len(logged) == len(set(logged)) and any(line.startswith("round_finished") for line in logged)

    assert controller.close_question() == CLOSE_QUESTION == "Training is running: leave the federation?"
    assert controller.join_button(_request(site)).text == "Leave"
    assert not controller.add_case_button(_request(site), True).enabled, "no case changes mid-run"
    controller.leave()
    deadline = time.monotonic() + 20
    while controller.poll().active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert controller.job.status.state == FederationState.LEFT and controller.close_question() is None
    assert controller.poll().connection == "Left the federation"


@pytest.mark.skipif(os.name == "nt", reason="POSIX executable script")
def test_a_failed_join_shows_one_dialog(scene, tmp_path):
    site = _site_with_a_case(scene, tmp_path)
    python, _ = _fake_python(tmp_path, fail=True)
    controller = FederationController(python=python, connect_timeout=None)
    controller.join(_request(site))
    dialogs = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        poll = controller.poll()
        dialogs += [poll.dialog] if poll.dialog else []
        if not poll.active:
            break
        time.sleep(0.05)
    for _ in range(5):
        assert controller.poll().dialog is None
    assert dialogs == ["Taking part in the federation failed:\nthe coordinator refused this site's reply"]
    assert controller.poll().connection == "Failed: the coordinator refused this site's reply"
    assert controller.join_button(_request(site)).text == "Join round"


def test_round_times_read_like_a_clock():
    assert [format_duration(s) for s in (None, 4.4, 59.6, 185, 3725)] == [
        "–",
        "4 s",
        "1 min 00 s",
        "3 min 05 s",
        "1 h 02 min",
    ]


# ---------------------------------------------------------------- settings, model, packages


class MemorySettings:
    """What qt.QSettings offers the panel: value(key, default) and setValue(key, value); values
    written by another Slicer come back as strings."""

    def __init__(self, values=None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


def test_settings_outlive_a_scene_and_read_back_from_strings():
    store = MemorySettings()
    saved = PanelSettings(
        superlink="fl.example.org:9093",
        site_name="site-a",
        site_folder="~/SegViz/sites/site-a",
        root_certificate="/certs/ca.crt",
        trust_file="/certs/federation-trust.yaml",
        node_key="/keys/node.key",
        insecure=False,
        share_final_batchnorm=True,
        last_model="/models/global.segviz",
    )
    saved.save(store)
    assert store.values["SegViz/superlink"] == "fl.example.org:9093"
    assert PanelSettings.load(store) == saved
    as_strings = MemorySettings({k: str(v).lower() if isinstance(v, bool) else v for k, v in store.values.items()})
    assert PanelSettings.load(as_strings) == saved
    assert PanelSettings.load(MemorySettings()) == PanelSettings()
    assert saved.site_dir() == Path.home() / "SegViz" / "sites" / "site-a" and PanelSettings().site_dir() is None


def _manifest_bundle(path: Path, **changes) -> Path:
    """A real (tiny) bundle whose manifest carries ``changes`` on top of what ``save_bundle`` wrote."""
    from SegVizLogic.bundle import save_bundle
    from SegVizLogic.network import NetworkConfig, build_network
    from SegVizLogic.preprocessing import Preprocessing

    source = path.with_name(path.stem + "-source.segviz")
    model = build_network(NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=0, body_features=4))
    save_bundle(source, model, Preprocessing(), force=True)
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop(MANIFEST_MEMBER))
    manifest.update(
        provenance={"strategy": "fedbn", "rounds": 10, "sites": ["site-a", "site-b"]},
        created="2026-11-20T10:00:00+00:00",
        metrics={"final": {"val_dice": {"liver": 0.91, "kidney": 0.85}}},
    )
    manifest.update(changes)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST_MEMBER, json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, data)
    source.unlink()
    return path


def test_model_summary_comes_from_the_manifest_without_torch(tmp_path):
    bundle = _manifest_bundle(tmp_path / "global.segviz")
    summary = describe_model(bundle)
    assert summary.usable and summary.text == (
        "Organs: liver, spleen, pancreas, kidney\n"
        "Trained by: site-a, site-b (fedbn, 10 federated rounds)\n"
        "Created: 2026-11-20\n"
        "Validation Dice: liver 0.91, kidney 0.85"
    )
    assert summary.signature.startswith("Signature: ")
    assert describe_model(None).text == "No model bundle selected." and not describe_model("").usable
    damaged = tmp_path / "damaged.segviz"
    damaged.write_bytes(b"PK\x03\x04 truncated")
    bad = describe_model(damaged)
    assert not bad.usable and str(damaged) in bad.text and "damaged or truncated" in bad.text
    newer = describe_model(_manifest_bundle(tmp_path / "newer.segviz", format_version=99))
    assert not newer.usable and "newer than this SegViz reads" in newer.text
    code = (
        "import sys; from SegVizSlicerLib.model_summary import describe_model; "
        f"assert describe_model({str(bundle)!r}).usable; print(sorted(m for m in ('torch', 'monai', 'flwr') if m in sys.modules))"
    )
    env = child_environment({"PYTHONPATH": os.pathsep.join([str(REPO / "SegVizSlicer"), str(REPO)])})
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "choosing a model must not import torch, MONAI or Flower"


def test_missing_packages_name_the_version_needed_and_installed(tmp_path):
    import importlib.metadata

    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\ntorch>=99\nmonai>=1.4,<2\nnibabel>=5.0,<6\nscipy>=1.11,<2\nrich>=13\npsutil>=5.9\n"
        "flwr>=1.42,<1.43\ncryptography>=42\n",
        encoding="utf-8",
    )
    missing = missing_packages("infer", requirements)
    assert [m.name for m in missing] == ["torch"]
    torch_version = importlib.metadata.version("torch")
    assert missing[0].describe() == f"torch (needs >=99; {torch_version} installed)"
    assert install_plan(missing) == (">=99", [])
    assert status_line([]) == "All Python packages SegViz needs are installed."
    requirements.write_text(
        requirements.read_text(encoding="utf-8").replace("rich>=13", "rich>=13\nsegviz-absent-package>=1"),
        encoding="utf-8",
    )
    assert "torch (needs >=99" in status_line(missing)
    with pytest.raises(ValueError, match="feature"):
        missing_packages("train", requirements)
    requirements.write_text("torch>=2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="does not list monai"):
        missing_packages("infer", requirements)
    requirements.write_text("torch>=2 ===\n", encoding="utf-8")
    with pytest.raises(ValueError, match="requirements.txt:1"):
        missing_packages("infer", requirements)
