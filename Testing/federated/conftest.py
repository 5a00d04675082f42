"""Shared fixtures of the federated tests: tiny phantom sites and a tiny network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from federated_tiny import SITE_NAMES, TINY_PREPROCESSING, tiny_training


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Phantom sites (2 cases each: 1 training, 1 validation), preprocessed once."""
    from SegVizLogic.phantom import generate_phantom_sites
    from SegVizLogic.training import load_site_data

    root = tmp_path_factory.mktemp("phantom")
    layout = generate_phantom_sites(root / "data", cases_per_site=2, external_cases=1)
    for site in layout.sites:
        load_site_data(site, TINY_PREPROCESSING, tiny_training())  # fills .segviz/cache
    return root / "data"


@pytest.fixture
def make_sites(phantom_root, tmp_path):
    """Fresh copies of phantom sites (their .segviz state starts empty but the cache is kept)."""

    def make(names=SITE_NAMES) -> list[Path]:
        out = []
        for name in names:
            target = tmp_path / "sites" / name
            shutil.copytree(phantom_root / name, target, ignore=shutil.ignore_patterns("federated"))
            out.append(target)
        return out

    return make
