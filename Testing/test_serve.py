"""`segviz serve`, the warm inference worker, as a real child process: requests over stdin, events
on stdout, the bundle loaded once, and the refusals of `segviz infer`; and the cold start of the
commands that need neither torch nor MONAI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegVizLogic.bundle import save_bundle
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing

LAUNCH = [sys.executable, "-c", "import sys; from SegVizLogic.cli import main; sys.exit(main())"]
SMALL = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8)


@pytest.fixture(scope="module")
def liver_everywhere(tmp_path_factory):
    """An untrained model whose liver head says 'liver' wherever it looks."""
    torch.manual_seed(0)
    model = build_network(SMALL)
    with torch.no_grad():
        for organ, bias in (("liver", 10.0), ("spleen", -10.0), ("pancreas", -10.0), ("kidney", -10.0)):
            model.heads[organ][1].weight.zero_()
            model.heads[organ][1].bias.fill_(bias)
    path = tmp_path_factory.mktemp("model") / "liver.segviz"
    return save_bundle(path, model, Preprocessing(spacing=(4.0, 4.0, 4.0)), training={"patch_size": [32, 32, 32]})


class Worker:
    def __init__(self):
        self.process = subprocess.Popen(
            [*LAUNCH, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def event(self, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"the worker ended: {self.process.stderr.read()[-2000:]}")
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError("no event in time")

    def request(self, **request) -> list[dict]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        events = []
        while not events or events[-1]["event"] not in ("served", "error", "stopped"):
            events.append(self.event())
        assert all(e.get("id") == request.get("id") for e in events)
        return events


def _infer_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, "infer", *argv], capture_output=True, text=True, encoding="utf-8", timeout=600, check=False
    )


def test_serve_keeps_the_bundle_and_answers_like_infer(real_data, liver_everywhere, tmp_path):
    ct = real_data / "totalseg_example" / "example_ct.nii.gz"
    worker = Worker()
    try:
        ready = worker.event()
        assert ready["event"] == "ready"
        first = worker.request(id="a", model=str(liver_everywhere), input=str(ct), output=str(tmp_path / "a.nii.gz"))
        assert [e["event"] for e in first][-2:] == ["done", "served"] and first[-1]["bundle_loaded"] is True
        second = worker.request(
            id="b",
            model=str(liver_everywhere),
            input=str(ct),
            output=str(tmp_path / "b.nrrd"),
            stats=str(tmp_path / "b.json"),
        )
        assert second[-1]["bundle_loaded"] is False, "the second request reuses the loaded bundle"
        assert second[-1]["pid"] == first[-1]["pid"] == ready["pid"]
        assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))["organs"]["liver"]["voxels"] > 0

        # The same label map as `segviz infer`, in the input's grid.
        done = _infer_cli("--model", str(liver_everywhere), "--input", str(ct), "--output", str(tmp_path / "c.nii.gz"))
        assert done.returncode == 0, done.stderr
        served, cli, image = (sitk.ReadImage(str(tmp_path / n)) for n in ("b.nrrd", "c.nii.gz", "a.nii.gz"))
        source = sitk.ReadImage(str(ct))
        assert served.GetSize() == source.GetSize() and np.allclose(served.GetSpacing(), source.GetSpacing())
        assert np.array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(cli))
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(cli))

        # The refusals of infer, word for word; nothing written, and the worker stays up.
        refused = worker.request(id="c", model=str(liver_everywhere), input=str(ct), output=str(tmp_path / "a.nii.gz"))
        cli = _infer_cli("--model", str(liver_everywhere), "--input", str(ct), "--output", str(tmp_path / "a.nii.gz"))
        assert cli.returncode == 2 and refused[-1]["event"] == "error"
        assert cli.stderr.strip() == f"error: {refused[-1]['message']}"
        missing = worker.request(
            id="d", model=str(liver_everywhere), input=str(tmp_path / "no.nii.gz"), output=str(tmp_path / "d.nii.gz")
        )
        assert missing[-1]["event"] == "error" and "no.nii.gz" in missing[-1]["message"]
        assert not (tmp_path / "d.nii.gz").exists()
        unknown = worker.request(id="e", model=str(liver_everywhere), inptu="x")
        assert "'inptu' is not an option of segviz infer" in unknown[-1]["message"]
        assert worker.request(id="f", command="shutdown")[-1]["event"] == "stopped"
        assert worker.process.wait(timeout=30) == 0
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def test_serve_ends_at_the_end_of_its_input():
    """A worker whose parent died (its stdin closed) ends by itself."""
    worker = Worker()
    try:
        assert worker.event()["event"] == "ready"
        worker.process.stdin.close()
        assert worker.process.wait(timeout=60) == 0
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


_PROBE = """
import contextlib, io, json, sys
from SegVizLogic.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
heavy = ("torch", "monai", "transformers", "matplotlib", "scipy.signal", "pandas")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _probe(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, encoding="utf-8", timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cold_commands_import_neither_torch_nor_monai(small_phantom, liver_everywhere):
    for argv in (
        ["--help"],
        ["organs"],
        ["model-info", str(liver_everywhere)],
        ["validate-site", str(small_phantom.sites[0])],
    ):
        result = _probe(*argv)
        assert result == {"code": 0, "loaded": []}, argv


def test_infer_imports_monai_without_its_heavy_optional_packages(real_data, liver_everywhere, tmp_path):
    pytest.importorskip("matplotlib")  # installed here: its absence below is MONAI's import skipping it
    ct = real_data / "totalseg_example" / "example_ct.nii.gz"
    result = _probe("infer", "--model", str(liver_everywhere), "--input", str(ct), "--output", str(tmp_path / "o.nrrd"))
    assert result == {"code": 0, "loaded": ["torch", "monai"]}
