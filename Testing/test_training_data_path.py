"""The training data path: cases memory-mapped from the cache, the site validated once per change,
patches prepared by worker threads with the same batches as on the training thread, and where
the steps' time goes."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from SegVizLogic import training
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.training import PatchBatches, TrainingConfig, load_site_data, seed_everything, train_site

SMALL = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8)
COARSE = Preprocessing(spacing=(6.0, 6.0, 6.0))
FAST = TrainingConfig(patch_size=(48, 48, 32), batch_size=4, samples_per_case=4, amp=False)


def _mapped_files() -> set[str]:
    """Files memory-mapped into this process (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}


@pytest.fixture
def liver_site(small_phantom, tmp_path):
    """A private copy of the phantom's liver site (tests here touch and break its files)."""
    site = tmp_path / "site-liver"
    shutil.copytree(small_phantom.sites[0], site, ignore=shutil.ignore_patterns(".segviz"))
    return site


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_second_load_reads_no_raw_image_and_maps_the_cache(liver_site, monkeypatch):
    first = load_site_data(liver_site, COARSE, FAST)
    cache = sorted((liver_site / ".segviz" / "cache").glob("*.pt"))
    assert len(cache) == 3 and (liver_site / ".segviz" / "validation.json").is_file()
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cache]

    def no_raw_reads(*args, **kwargs):
        raise AssertionError("a raw image was read although nothing changed")

    # Neither the validation (site._check_cases) nor the preprocessing (training.load_case) may
    # read an image of an unchanged site: both come from records on disk.
    monkeypatch.setattr("SegVizLogic.site._check_cases", no_raw_reads)
    monkeypatch.setattr(training, "load_case", no_raw_reads)
    again = load_site_data(liver_site, COARSE, FAST)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in cache] == stamps  # read, not rewritten
    for before, after in zip(first.train_items + first.val_items, again.train_items + again.val_items):
        assert before["case"] == after["case"]
        assert torch.equal(torch.as_tensor(before["image"]), torch.as_tensor(after["image"]))
        assert torch.equal(after["label_fg_indices"], before["label_fg_indices"])
    # The tensors live in the cache files, mapped: not copied into the process's memory.
    assert {str(p.resolve()) for p in cache} <= _mapped_files()


def test_a_changed_file_is_validated_again_and_a_broken_one_refused(liver_site, monkeypatch):
    from SegVizLogic import site as site_module
    from SegVizLogic.site import SiteValidationError, validated_site

    checked = []
    original = site_module._check_cases
    monkeypatch.setattr(
        site_module, "_check_cases", lambda site, problems: checked.append(1) or original(site, problems)
    )
    validated_site(liver_site)
    validated_site(liver_site)
    assert len(checked) == 1  # validated once, then from the record
    label = min((liver_site / "labels").iterdir())
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: validated again
    validated_site(liver_site)
    assert len(checked) == 2
    image = sorted((liver_site / "images").iterdir())[1]
    intact = image.read_bytes()
    image.write_bytes(b"not an image")
    with pytest.raises(SiteValidationError, match=image.name):
        validated_site(liver_site)
    with pytest.raises(SiteValidationError, match=image.name):  # a failure is never recorded as a pass
        validated_site(liver_site)
    assert len(checked) == 4
    image.write_bytes(intact)
    validated_site(liver_site)
    validated_site(liver_site)
    assert len(checked) == 5
    # site.json's content is part of the stamp (a description added: checked again)
    site_json = liver_site / "site.json"
    declaration = json.loads(site_json.read_text())
    site_json.write_text(json.dumps({**declaration, "description": "portal-venous phase"}))
    validated_site(liver_site)
    assert len(checked) == 6


def _cases(count: int = 3) -> list[dict]:
    """Small in-memory cases whose intensity names the patient."""
    label = torch.zeros(1, 40, 40, 24, dtype=torch.uint8)
    label[0, 10:20, 10:20, 5:15] = 1
    fg = torch.nonzero(label.flatten() > 0).flatten().int()
    bg = torch.nonzero(label.flatten() == 0).flatten().int()
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.rand(1, 40, 40, 24, generator=generator) + 10.0 * index,
            "label": label,
            "label_fg_indices": fg,
            "label_bg_indices": bg,
            "annotated": torch.tensor([True, False, False, False]),
            "case": f"case{index}",
        }
        for index in range(count)
    ]


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_threads_give_the_batches_of_the_training_thread(workers, monkeypatch):
    config = TrainingConfig(patch_size=(16, 16, 8), batch_size=4, samples_per_case=5, seed=7)
    made_on = []
    original = PatchBatches._patch

    def recorded(self, case, seed):
        made_on.append(threading.current_thread().name)
        return original(self, case, seed)

    monkeypatch.setattr(PatchBatches, "_patch", recorded)
    synchronous, threaded = PatchBatches(_cases(), config), PatchBatches(_cases(), config, workers=workers)
    for epoch in range(3):  # each iteration is a new epoch: new order, new augmentation
        made_on.clear()
        expected = list(synchronous)
        assert set(made_on) == {threading.current_thread().name}
        made_on.clear()
        got = list(threaded)
        assert made_on and all(name.startswith("segviz-patches") for name in made_on)  # off the training thread
        assert len(got) == len(expected) == len(threaded) == 4  # 15 patches: 4, 4, 4, 3
        for a, b in zip(expected, got):
            assert a["case"] == b["case"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            assert type(a["image"]) is torch.Tensor  # plain tensors for the network
        if epoch == 0:
            first = expected
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, expected))  # epochs differ


def test_stopping_early_ends_the_worker_threads():
    config = TrainingConfig(patch_size=(16, 16, 8), batch_size=2, samples_per_case=20, seed=1)
    batches = PatchBatches(_cases(), config, workers=2)
    for index, _ in enumerate(batches):
        if index == 1:
            break  # as recalibrate_batchnorm does
    deadline = time.monotonic() + 30
    while any(t.name.startswith("segviz-patches") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("segviz-patches") for t in threading.enumerate())


def test_loader_workers_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(training.LOADER_WORKERS_ENV, "3")
    assert training.default_loader_workers("cuda") == 3 and training.default_loader_workers("cpu") == 3
    monkeypatch.setenv(training.LOADER_WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="SEGVIZ_LOADER_WORKERS"):
        training.default_loader_workers("cpu")
    monkeypatch.delenv(training.LOADER_WORKERS_ENV)
    assert 1 <= training.default_loader_workers("cuda") <= 8
    with pytest.raises(ValueError, match="workers"):
        PatchBatches(_cases(), FAST, workers=-1)


@pytest.mark.filterwarnings("ignore:Num foregrounds")
def test_threaded_training_equals_synchronous_and_hides_a_slow_data_path(small_phantom, monkeypatch):
    """The same seed trains the same model with or without worker threads; a batch that takes
    0.3 s to prepare stalls every step on the training thread, and hardly any with 3 workers."""
    data = load_site_data(small_phantom.sites[0], COARSE, FAST)
    config = replace(FAST, samples_per_case=8)  # 2 cases x 8 patches: 4 steps of 4
    original = PatchBatches._batch

    def slow(self, plan):
        time.sleep(0.3)  # a data path slower than the step (sleeping: no CPU taken from the step)
        return original(self, plan)

    monkeypatch.setattr(PatchBatches, "_batch", slow)
    runs = {}
    for workers in (0, 3):
        seed_everything(0)
        model = build_network(SMALL)
        result = train_site(
            model, data, epochs=2, lr=1e-3, device="cpu", config=config, validate=False, loader_workers=workers
        )
        runs[workers] = (result, model.state_dict())
    (sync, sync_state), (threaded, threaded_state) = runs[0], runs[3]
    assert sync.steps == threaded.steps == 8
    np.testing.assert_allclose(threaded.losses, sync.losses, rtol=1e-6)
    assert all(torch.allclose(sync_state[k].float(), threaded_state[k].float(), atol=1e-6) for k in sync_state)
    for result, workers in ((sync, 0), (threaded, 3)):
        times = result.data_path
        assert times.device == "cpu" and times.workers == workers
        assert 0 < times.busy_seconds < times.steps_seconds
        assert times.busy_seconds + times.data_wait_seconds <= times.steps_seconds * 1.01 + 0.05
        assert times.to_dict()["busy_fraction"] == pytest.approx(times.busy_seconds / times.steps_seconds)
    # Synchronous: every one of the 8 steps (and the 2 recalibration batches of the last epoch
    # are outside the step loop) waited the 0.3 s its batch took.
    assert sync.data_path.data_wait_seconds >= 8 * 0.3
    # Threaded: the first batch of each epoch waits; the rest were prepared during the steps.
    assert threaded.data_path.data_wait_seconds < sync.data_path.data_wait_seconds - 4 * 0.3
    assert threaded.data_path.busy_fraction > sync.data_path.busy_fraction
