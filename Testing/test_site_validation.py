"""Leave-site-out validation: a site's cases are scored with BatchNorm that holds nothing of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegVizLogic.bundle import load_bundle, save_bundle
from SegVizLogic.network import PARTITION_BATCHNORM, NetworkConfig, build_network, partition_state
from SegVizLogic.preprocessing import Preprocessing
from SegVizLogic.site_validation import bundle_without_site, summarise

SMALL = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)
SITES = {"site-a": ["liver"], "site-b": ["spleen"], "site-c": ["liver", "kidney"]}


@pytest.fixture(scope="module")
def federated_bundle(tmp_path_factory):
    model = build_network(SMALL)
    template = partition_state(model)[PARTITION_BATCHNORM]
    variants = {}
    for index, name in enumerate(SITES):
        variants[f"site:{name}"] = {
            k: (np.full_like(v, float(index + 1)) if v.dtype.kind == "f" else v + 10 * (index + 1))
            for k, v in template.items()
        }
    variants["averaged"] = {k: np.full_like(v, 2.0) if v.dtype.kind == "f" else v + 20 for k, v in template.items()}
    path = tmp_path_factory.mktemp("bundle") / "fed.segviz"
    save_bundle(
        path,
        model,
        Preprocessing(),
        provenance={"organs_per_site": SITES},
        batchnorm_variants=variants,
        default_batchnorm="adapt",
    )
    return load_bundle(path)


def test_leaving_a_site_out_recomputes_the_federation_batchnorm_without_it(federated_bundle):
    reduced = bundle_without_site(federated_bundle, "site-a")
    assert "site:site-a" not in reduced.batchnorm_variants and "site:site-a" not in reduced.batchnorm_choices()
    key = next(k for k, v in reduced.batchnorm_variants["averaged"].items() if v.dtype.kind == "f")
    np.testing.assert_allclose(reduced.batchnorm_variants["averaged"][key], 2.5)  # sites b (2) and c (3)
    np.testing.assert_allclose(reduced.batchnorm_variants["organ:liver"][key], 3.0)  # only site c left
    assert "organ:liver" in reduced.batchnorm_variants and "organ:spleen" in reduced.batchnorm_variants
    # "averaged" at site-a is the others' average, never site-a's own statistics
    start = reduced.build_model("averaged")
    assert torch.allclose(start.state_dict()[key], torch.tensor(2.5))
    # the original bundle is untouched
    np.testing.assert_allclose(federated_bundle.batchnorm_variants["averaged"][key], 2.0)
    with pytest.raises(ValueError, match="no BatchNorm of site"):
        bundle_without_site(federated_bundle, "site-x")


def test_summary_is_the_mean_per_choice_and_organ():
    records = [
        {"choice": "adapt", "site": "a", "case": "c1", "organ": "liver", "dice": 0.8},
        {"choice": "adapt", "site": "a", "case": "c2", "organ": "liver", "dice": 0.6},
        {"choice": "adapt", "site": "b", "case": "c1", "organ": "spleen", "dice": 0.9},
        {"choice": "averaged", "site": "a", "case": "c1", "organ": "liver", "dice": 0.5},
    ]
    summary = summarise(records)
    assert summary["adapt"] == pytest.approx({"liver": 0.7, "spleen": 0.9, "mean": 0.8})
    assert summary["averaged"] == pytest.approx({"liver": 0.5, "mean": 0.5})
