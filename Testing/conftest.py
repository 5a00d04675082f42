"""Shared fixtures: paths of the real CT cases and a tiny phantom layout."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real CT cases (skip when a checkout has none beside it)."""
    if not (REAL_DATA / "totalseg_example" / "example_ct.nii.gz").is_file():
        pytest.skip(f"real CT cases not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory):
    """Phantom layout with 3 cases per site (2 training, 1 validation) and 2 external cases."""
    from SegVizLogic.phantom import generate_phantom_sites

    return generate_phantom_sites(tmp_path_factory.mktemp("phantom") / "data", cases_per_site=3, external_cases=2)


@pytest.fixture(scope="session")
def liver_bundle(small_phantom, tmp_path_factory):
    """A small model trained for 12 epochs on the phantom's liver site only (shared by tests)."""
    from SegVizLogic.local_training import train_bundle
    from SegVizLogic.network import NetworkConfig
    from SegVizLogic.preprocessing import Preprocessing
    from SegVizLogic.training import TrainingConfig

    path = tmp_path_factory.mktemp("model") / "liver.segviz"
    return train_bundle(
        [small_phantom.sites[0]],
        path,
        network=NetworkConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, body_features=8),
        preprocessing=Preprocessing(spacing=(6.0, 6.0, 6.0)),
        training=TrainingConfig(patch_size=(48, 48, 32), batch_size=4, samples_per_case=4, amp=False),
        epochs=12,
        lr=3e-3,
        device="cpu",
    )
