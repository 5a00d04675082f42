"""Local training on phantom sites: the loss falls and Dice beats chance; bundles record it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from SegVizLogic.bundle import load_bundle
from SegVizLogic.local_training import train_bundle
from SegVizLogic.network import NetworkConfig, build_network
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.training import TrainingConfig, evaluate_dice, load_site_data, seed_everything, train_site

SMALL = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8)
COARSE = Preprocessing(spacing=(6.0, 6.0, 6.0))
FAST = TrainingConfig(patch_size=(48, 48, 32), batch_size=4, samples_per_case=4, amp=False)


def test_site_data_is_cached_and_split(small_phantom, tmp_path):
    import shutil

    # A copy without the cache other tests fill (with their own preprocessing): three entries are this load's.
    site = Path(
        shutil.copytree(small_phantom.sites[0], tmp_path / "site-liver", ignore=shutil.ignore_patterns(".segviz"))
    )
    data = load_site_data(site, COARSE, FAST)
    assert data.name == "site-liver" and data.organs == ("liver",)
    assert len(data.train_items) == 2 and len(data.val_items) == 1
    image, label = data.train_items[0]["image"], data.train_items[0]["label"]
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(np.unique(np.asarray(label)).tolist()) == {0, 1}  # liver only, SegViz value 1
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0), [6, 6, 6], atol=1e-5)
    cached = list((site / ".segviz" / "cache").glob("*.pt"))
    assert len(cached) == 3
    again = load_site_data(site, COARSE, FAST)  # second load reads the cache
    assert torch.equal(torch.as_tensor(again.train_items[0]["image"]), torch.as_tensor(image))


def test_short_training_lowers_loss_and_beats_chance(small_phantom, liver_bundle):
    bundle = load_bundle(liver_bundle)  # 12 epochs on the liver site (conftest)
    history = bundle.metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    data = load_site_data(small_phantom.sites[0], COARSE, FAST)
    seed_everything(0)
    chance = evaluate_dice(build_network(SMALL), data, "cpu", FAST).get("liver", 0.0)
    trained = evaluate_dice(bundle.build_model(), data, "cpu", FAST)["liver"]
    # the liver is a few % of the volume: a trained head must overlap far better than chance
    assert trained > 0.5 and trained > chance + 0.2
    assert trained == pytest.approx(bundle.metrics["final"]["val_dice"]["liver"], abs=1e-6)


@pytest.mark.parametrize(("samples_per_case", "batch_size", "steps"), [(4, 4, 2), (8, 4, 4), (2, 4, 1), (3, 4, 2)])
def test_one_epoch_makes_the_steps_its_progress_bar_announces(small_phantom, samples_per_case, batch_size, steps):
    """2 training cases: an epoch is 2 x samples_per_case patches in steps of batch_size patches."""
    from SegVizLogic.progress import ProgressReporter

    class Recorder(ProgressReporter):
        def __init__(self):
            super().__init__("json")
            self.events = []

        def emit(self, event, **fields):
            self.events.append((event, fields))

    data = load_site_data(small_phantom.sites[0], COARSE, FAST)
    config = replace(FAST, samples_per_case=samples_per_case, batch_size=batch_size)
    recorder = Recorder()
    result = train_site(
        build_network(SMALL), data, epochs=1, lr=1e-3, device="cpu", config=config, validate=False, reporter=recorder
    )
    assert result.steps == steps
    assert result.num_examples == 2 and np.isfinite(result.loss)
    progress = [f for e, f in recorder.events if e == "progress" and f.get("stage") == "train"]
    assert progress and all(f["total"] == steps for f in progress) and progress[-1]["current"] == steps


@pytest.mark.filterwarnings("ignore:The image's intensity is a single value")  # constant test images
def test_batches_hold_the_configured_number_of_patches_from_several_patients():
    """batch 4 with 8 patches per case is 4 patches a step (not 8 from one patient), and a
    patient's patches are spread over the epoch's batches."""
    from SegVizLogic.training import patch_loader

    label = torch.zeros(1, 40, 40, 24, dtype=torch.uint8)
    label[0, 10:20, 10:20, 5:15] = 1
    cases = []
    for index in range(3):
        image = torch.full((1, 40, 40, 24), 100.0 * index)  # the intensity names the patient (augmentation or not)
        fg = torch.nonzero(label.flatten() > 0).flatten().int()
        bg = torch.nonzero(label.flatten() == 0).flatten().int()
        cases.append(
            {"image": image, "label": label, "label_fg_indices": fg, "label_bg_indices": bg, "case": f"case{index}"}
        )
    config = TrainingConfig(patch_size=(16, 16, 8), batch_size=4, samples_per_case=8, seed=3)
    for epoch in range(2):
        batches = list(patch_loader(cases, config))
        assert [b["image"].shape[0] for b in batches] == [4] * 6
        owners = [[int(v) for v in torch.round(b["image"].flatten(1).mean(1) / 100)] for b in batches]
        assert all(b["case"] == [f"case{p}" for p in o] for b, o in zip(batches, owners))  # per-patch keys follow
        patients = [set(o) for o in owners]
        per_patient = np.bincount([p for o in owners for p in o], minlength=3)
        assert per_patient.tolist() == [8, 8, 8]  # every patient's 8 patches, once per epoch
        assert sum(len(p) > 1 for p in patients) >= 4, patients  # most batches mix patients
    # the same seed draws the same patches
    again = [b["image"] for b in patch_loader(cases, config)]
    first = [b["image"] for b in patch_loader(cases, config)]
    assert all(torch.equal(a, b) for a, b in zip(again, first))


def test_cache_key_follows_files_preprocessing_code_and_monai(small_phantom, monkeypatch):
    import monai

    from SegVizLogic import training
    from SegVizLogic.site import validate_site

    case = validate_site(small_phantom.sites[0]).cases[0]
    key = training.cache_key(case.image_path, case.label_path, COARSE)
    assert key == training.cache_key(case.image_path, case.label_path, COARSE)
    assert key != training.cache_key(case.image_path, case.label_path, Preprocessing(spacing=(5.0, 5.0, 5.0)))
    monkeypatch.setattr(training, "CACHE_VERSION", training.CACHE_VERSION + 1)
    code_changed = training.cache_key(case.image_path, case.label_path, COARSE)
    monkeypatch.setattr(monai, "__version__", "0.0.1")
    monai_changed = training.cache_key(case.image_path, case.label_path, COARSE)
    assert len({key, code_changed, monai_changed}) == 3
    # a new key is a new entry: the stale one is never read as current
    before = set((small_phantom.sites[0] / ".segviz" / "cache").glob("*.pt"))
    data = load_site_data(small_phantom.sites[0], COARSE, FAST)
    after = set((small_phantom.sites[0] / ".segviz" / "cache").glob("*.pt"))
    assert len(after - before) == 3 and (after - before) >= {p for p in after if p.stem == monai_changed}
    item = data.train_items[0]
    fg = item["label_fg_indices"]
    assert fg.dtype == torch.int32 and torch.equal(
        fg.long(), torch.nonzero(torch.as_tensor(item["label"]).flatten() > 0).flatten()
    )


def test_train_bundle_restricts_output_to_trained_organs(small_phantom, tmp_path):
    out = train_bundle(
        [small_phantom.sites[1]],
        tmp_path / "spleen.segviz",
        network=SMALL,
        preprocessing=COARSE,
        training=FAST,
        epochs=2,
        lr=1e-3,
        device="cpu",
    )
    bundle = load_bundle(out)
    assert bundle.trained_organs == ("spleen",)
    assert bundle.provenance["strategy"] == "local" and bundle.provenance["sites"] == ["site-spleen"]
    assert len(bundle.metrics["history"]) == 2
    with pytest.raises(Exception, match="already exists"):
        train_bundle([small_phantom.sites[1]], out, network=SMALL, preprocessing=COARSE, training=FAST, epochs=1)


def test_best_epoch_is_chosen_among_the_validated_epochs(small_phantom, tmp_path, monkeypatch):
    """``validate_every=2`` over 5 epochs validates after epochs 2, 4 and 5 only (an experiment's
    local and central arms: once per round's worth of epochs), and the bundle keeps the best of them."""
    from SegVizLogic import training

    validated = []
    original = training.evaluate_dice

    def counting(model, sites, device, config):
        validated.append(len(validated))
        return original(model, sites, device, config)

    monkeypatch.setattr(training, "evaluate_dice", counting)
    out = train_bundle(
        [small_phantom.sites[1]],
        tmp_path / "spleen.segviz",
        network=SMALL,
        preprocessing=COARSE,
        training=replace(FAST, samples_per_case=2),
        epochs=5,
        lr=1e-3,
        device="cpu",
        validate_every=2,
    )
    bundle = load_bundle(out)
    history = bundle.metrics["history"]
    assert [h["epoch"] for h in history] == [2, 4, 5] and len(validated) == 3
    scores = [float(np.mean(list(h["val_dice"].values()))) for h in history]
    best = [h for h, score in zip(history, scores) if score == max(scores)][-1]  # a tie goes to the later epoch
    assert bundle.provenance["best_epoch"] == best["epoch"]
    assert bundle.metrics["final"]["val_dice"] == best["val_dice"]
    assert "every 2" in bundle.provenance["selection"]
    with pytest.raises(ValueError, match="validate_every"):
        train_bundle(
            [small_phantom.sites[1]],
            tmp_path / "x.segviz",
            network=SMALL,
            preprocessing=COARSE,
            training=FAST,
            epochs=1,
            validate_every=0,
        )


def test_training_config_validation():
    with pytest.raises(ValueError, match="label_mode"):
        TrainingConfig(label_mode="soft")
    with pytest.raises(ValueError, match="patch_size"):
        TrainingConfig(patch_size=(4, 4, 4))
    assert TrainingConfig.from_dict(FAST.to_dict()) == FAST


def test_batchnorm_recalibration_matches_current_weights_and_keeps_the_count():
    from torch import nn

    from SegVizLogic.training import cosine_factor, recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 1), nn.BatchNorm3d(3))
    bn = model[1]
    bn.running_mean.fill_(100.0)  # stale: from weights that no longer exist
    bn.num_batches_tracked.fill_(7)
    batches = [{"image": torch.rand(2, 1, 4, 4, 4) + i} for i in range(3)]
    with torch.no_grad():
        expected = torch.stack([model[0](b["image"]).mean(dim=(0, 2, 3, 4)) for b in batches]).mean(0)
    assert recalibrate_batchnorm(model, iter(batches), torch.device("cpu"), max_batches=3) == 3
    torch.testing.assert_close(bn.running_mean, expected, atol=1e-5, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 7 and bn.momentum == 0.1 and not model.training
    assert (
        cosine_factor(0.0) == 1.0 and abs(cosine_factor(1.0) - 0.1) < 1e-12 and abs(cosine_factor(0.5) - 0.55) < 1e-12
    )


def test_organ_contrast_shift_moves_each_annotated_organ_by_its_own_offset_and_nothing_else():
    """A site's organ shown as another contrast phase would show it: one offset per annotated organ,
    within +-offsets, background untouched; off by default, and the patch pipeline holds it when asked."""
    from SegVizLogic.training import RandAnnotatedOrganShiftd, _patch_transform

    image = torch.rand(1, 12, 10, 8)
    label = torch.zeros(1, 12, 10, 8, dtype=torch.uint8)
    label[0, :4] = 2
    label[0, 8:] = 3
    shift = RandAnnotatedOrganShiftd(offsets=0.19, prob=1.0)
    offsets = []
    for seed in range(20):
        shift.set_random_state(seed)
        moved = shift({"image": image, "label": label})["image"] - image
        assert torch.equal(moved[label == 0], torch.zeros_like(moved[label == 0]))
        per_organ = [moved[label == value] for value in (2, 3)]
        assert all(float(d.max() - d.min()) < 1e-6 and abs(float(d[0])) <= 0.19 + 1e-6 for d in per_organ)
        offsets.append((float(per_organ[0][0]), float(per_organ[1][0])))
    assert len({round(a, 6) for a, _ in offsets}) == 20 and any(abs(a - b) > 0.05 for a, b in offsets)
    assert min(a for a, _ in offsets) < -0.05 < 0.05 < max(a for a, _ in offsets)  # brighter and darker
    never = RandAnnotatedOrganShiftd(prob=0.0)
    assert torch.equal(never({"image": image, "label": label})["image"], image)
    names = lambda config: [type(t).__name__ for t in _patch_transform(config).transforms]
    assert "RandAnnotatedOrganShiftd" not in names(TrainingConfig())
    assert "RandAnnotatedOrganShiftd" in names(TrainingConfig(organ_contrast_augmentation=True))
    scanner = names(TrainingConfig(scanner_augmentation=True))
    assert {"RandGaussianSmoothd", "RandSimulateLowResolutiond"} <= set(scanner)
    assert TrainingConfig.from_dict(TrainingConfig(scanner_augmentation=True).to_dict()).scanner_augmentation
