"""A real federation on this machine, driven the way the panel drives it: two sites' cases are MRML
nodes saved into site folders, "Join round" (the FederationController) starts the real `segviz
federation join` with the panel's options, a real SuperLink and `segviz federation run` coordinate
one FedBN round, and the resulting bundle is applied to the real CT through the panel's Logic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_core_guard import require_mrml

slicer = require_mrml()
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("flwr")

from SegVizSlicerLib.federation_controller import FederationController, JoinRequest
from SegVizSlicerLib.job import ProcessJob, child_environment, segviz_command
from SegVizSlicerLib.logic import SegVizSlicerLogic
from SegVizSlicerLib.panel_state import FederationState
from SegVizSlicerLib.segment_import import import_label_map
from SegVizSlicerLib.site_export import Case, write_case
from SegVizSlicerLib.volume_nodes import volume_node_from_image

from SegVizLogic.organs import organ_by_name

pytestmark = pytest.mark.slow

SITES = ("site-liver", "site-kidney")
TINY = [
    "--rounds",
    "1",
    "--local-epochs",
    "1",
    "--patch",
    "32,32,16",
    "--channels",
    "4,8,16",
    "--batch-size",
    "1",
    "--samples-per-case",
    "1",
    "--spacing",
    "6,6,6",
    "--min-clients",
    "2",
    "--wait-timeout",
    "300",
    "--round-timeout",
    "600",
    "--timeout",
    "900",
]


def _cli_has(*words: str, option: str) -> bool:
    done = subprocess.run(
        segviz_command(sys.executable) + [*words, "--help"],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        env=child_environment(),
        timeout=120,
    )
    return done.returncode == 0 and option in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_site_into_scene(scene, site_dir: Path) -> tuple[list[Case], list[str]]:
    """The site's cases as a person would have them in Slicer: CT volume + organ segmentation."""
    description = json.loads((site_dir / "site.json").read_text(encoding="utf-8"))
    cases = []
    for image_path in sorted((site_dir / "images").iterdir()):
        label_path = site_dir / "labels" / image_path.name
        ct = sitk.ReadImage(str(image_path))
        volume = volume_node_from_image(scene, ct, f"{description['name']} {image_path.name.split('.')[0]}")
        local = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(local)
        segviz = np.zeros(array.shape, np.uint8)
        for value, organ in description["labels"].items():
            segviz[array == int(value)] = organ_by_name(organ).label
        labels = sitk.GetImageFromArray(segviz)
        labels.CopyInformation(local)
        segmentation = import_label_map(scene, labels, name=f"{volume.GetName()} organs", reference_volume_node=volume)
        cases.append(Case(volume, segmentation))
    return cases, description["organs"]


def test_two_sites_join_a_real_federation_from_mrml_and_apply_its_model(tmp_path, totalseg_example):
    if not _cli_has("federation", "join", option="--share-final-batchnorm") or not _cli_has(
        "federation", "run", option="--rounds"
    ):
        pytest.skip("segviz federation join lacks the consent option --share-final-batchnorm the panel passes")
    from SegVizLogic.phantom import generate_phantom_sites

    generate_phantom_sites(tmp_path / "phantom", cases_per_site=2, external_cases=1)
    scene = slicer.vtkMRMLScene()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # `run` submits through the SuperLink's Control API, which listens on loopback apart from the sites' address.
    control_address = f"127.0.0.1:{_free_port()}"
    jobs, processes = [], []
    try:
        superlink = ProcessJob(
            segviz_command(sys.executable)
            + [
                "federation",
                "superlink",
                "--address",
                address,
                "--control-address",
                control_address,
                "--app-registry-port",
                str(_free_port()),
                "--insecure",
                "--state-dir",
                str(tmp_path / "superlink"),
                "--progress",
                "json",
            ]
        )
        superlink.start()
        processes.append(superlink)
        controllers = []
        for site in SITES:
            cases, organs = _load_site_into_scene(scene, tmp_path / "phantom" / site)
            site_dir = tmp_path / "work" / "sites" / site
            for case in cases:
                write_case(case, site_dir, organs)
            controller = FederationController(python=sys.executable, connect_timeout=240)
            request = JoinRequest(address, site_dir, site, tuple(organs), insecure=True, share_final_batchnorm=True)
            assert controller.join_button(request).enabled
            jobs.append(controller.join(request))
            controllers.append(controller)
        # `federation run` does not wait for the SuperLink to listen; the sites' "connected" says it does.
        deadline = time.monotonic() + 240
        while not all(job.poll().connected for job in jobs) and time.monotonic() < deadline:
            superlink.poll()
            assert all(job.status.active for job in jobs), [job.status.message for job in jobs]
            time.sleep(0.2)
        run = ProcessJob(
            segviz_command(sys.executable)
            + [
                "federation",
                "run",
                "--superlink",
                control_address,
                "--insecure",
                "--out",
                str(tmp_path / "run"),
                *TINY,
                "--progress",
                "json",
            ]
        )
        run.start()
        processes.append(run)

        deadline = time.monotonic() + 900
        run_output = []
        while any(job.poll().active for job in jobs) and time.monotonic() < deadline:
            superlink.poll()
            run_output += run.poll()
            assert run.returncode in (None, 0), (run_output[-10:], run.stderr_tail[-15:])
            time.sleep(0.2)
        while run.running and time.monotonic() < deadline:
            run_output += run.poll()
            time.sleep(0.2)
        for job in jobs:
            status = job.status
            assert status.state == FederationState.FINISHED, (
                status.message,
                status.log[-15:],
                job.process.stderr_tail[-10:],
            )
            assert status.connected and status.round == 1
            assert any(line.startswith("update_sent") for line in status.log), status.log[-15:]
        assert run.returncode == 0, (run_output[-10:], run.stderr_tail[-15:])
    finally:
        for job in jobs:
            job.leave(timeout=5.0, wait=True)
        for process in processes:
            process.stop(timeout=5.0, wait=True)

    # What "Join round" wrote is a valid site folder holding the MRML cases.
    site_json = json.loads((tmp_path / "work" / "sites" / "site-liver" / "site.json").read_text(encoding="utf-8"))
    assert site_json == {"name": "site-liver", "organs": ["liver"], "labels": {"1": "liver"}}

    model = tmp_path / "run" / "model.segviz"
    assert model.is_file(), sorted(p.name for p in (tmp_path / "run").iterdir())
    logic = SegVizSlicerLogic(scene=scene, temp_root=tmp_path / "temp", python=sys.executable)
    summary = logic.describeModel(model)
    assert summary.usable and "site-liver" in summary.text and "1 federated rounds" in summary.text

    ct_path, _ = totalseg_example
    volume = volume_node_from_image(scene, sitk.ReadImage(str(ct_path)), "example_ct")
    logic.startInference(volume, model, "cpu")
    segmentation, table = logic.waitForInference(timeout=900, splitKidney=True)
    assert table.GetTable().GetNumberOfRows() == segmentation.GetSegmentation().GetNumberOfSegments()
