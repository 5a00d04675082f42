"""A federation's training setup: `federation simulate --config` trains with exactly the file's
settings (quietly), `federation run` maps them onto the Flower run config, and model-info shows
the FedBN bundle's settings, per-site validation and the BatchNorm choices that mean something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from SegVizLogic.bundle_manifest import read_manifest
from SegVizLogic.cli import build_parser, main
from SegVizLogic.federated.simulation import simulation_available
from SegVizLogic.federated.task import FederationSettings
from SegVizLogic.training_setup import load_preset, setup_from_sections

REPO = Path(__file__).resolve().parents[2]

# The tiny network of the federated tests, with a validation case per site and settings the
# old flags could not reach (residual units, body features, validation fraction, HU window).
SETUP = """
[network]
channels = [4, 8, 16]
strides = [2, 2]
num_res_units = 1
body_features = 4

[preprocessing]
spacing = [6.0, 6.0, 6.0]
hu_window = [-160.0, 240.0]

[training]
patch_size = [32, 32, 16]
batch_size = 2
samples_per_case = 2
val_fraction = 0.5
amp = false

[federation]
rounds = 2
local_epochs = 1
lr = 0.005
weighting = "examples"
"""


def test_run_maps_the_setup_onto_the_flower_run_config(tmp_path):
    from SegVizLogic.federated.cli import _run_settings

    config = tmp_path / "setup.toml"
    config.write_text(SETUP, encoding="utf-8")
    args = build_parser().parse_args(
        ["federation", "run", "--out", "o", "--config", str(config), "--rounds", "5", "--strategy", "fedavg"]
    )
    settings = _run_settings(args)
    setup = setup_from_sections(tomllib.loads(SETUP))
    run_config = settings.to_run_config()
    assert run_config["num-server-rounds"] == 5 and run_config["local-epochs"] == 1 and run_config["lr"] == 0.005
    assert run_config["weighting"] == "examples" and run_config["strategy"] == "fedavg"
    assert json.loads(run_config["network-config"]) == setup.network.to_dict()
    assert json.loads(run_config["training-config"]) == setup.training.to_dict()
    assert json.loads(run_config["preprocessing"]) == setup.preprocessing.to_dict()
    # what the ServerApp reads back from the run config is the same setup
    again = FederationSettings.from_run_config(run_config)
    assert again.network == setup.network and again.preprocessing == setup.preprocessing
    demo = _run_settings(build_parser().parse_args(["federation", "run", "--out", "o", "--preset", "demo"]))
    assert (demo.rounds, demo.local_epochs, demo.network) == (48, 2, load_preset("demo").network)


def test_naive_label_mode_is_refused_for_a_federation(tmp_path, capsys):
    config = tmp_path / "naive.toml"
    config.write_text('[training]\nlabel_mode = "naive"\n', encoding="utf-8")
    code = main(
        ["federation", "simulate", "--site", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "naive.toml: a federation trains with partial labels" in err[0]


@pytest.mark.skipif(not simulation_available(), reason="Flower's simulation engine needs ray")
def test_simulate_with_a_config_file_records_it_and_model_info_shows_each_site(make_sites, tmp_path):
    config = tmp_path / "setup.toml"
    config.write_text(SETUP, encoding="utf-8")
    sites = make_sites(("site-liver", "site-kidney"))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "SegVizLogic.cli", "federation", "simulate", "--config", str(config)]
    command += ["--out", str(out), "--device", "cpu", "--progress", "rich"]
    for site in sites:
        command += ["--site", str(site)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
        check=False,
        env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Flower's deprecation notice and its actor shutdown notice are silenced (and only those)
    assert "deprecated" not in done.stderr.lower() and "Manually terminating" not in done.stderr
    assert "round 2/2" in done.stderr

    bundle = out / "model.segviz"
    manifest = read_manifest(bundle)
    setup = setup_from_sections(tomllib.loads(SETUP))
    assert manifest["network"] == setup.network.to_dict()
    assert manifest["preprocessing"] == setup.preprocessing.to_dict()
    assert {
        k: v for k, v in manifest["training"].items() if k not in ("lr", "local_epochs")
    } == setup.training.to_dict()
    provenance = manifest["provenance"]
    assert (provenance["rounds"], provenance["local_epochs"], provenance["lr"], provenance["weighting"]) == (
        2,
        1,
        0.005,
        "examples",
    )

    info = json.loads(
        subprocess.check_output(
            [sys.executable, "-m", "SegVizLogic.cli", "model-info", str(bundle), "--json"], timeout=120
        )
    )
    assert info["setup"]["federation"] == {"rounds": 2, "local_epochs": 1, "lr": 0.005, "weighting": "examples"}
    assert info["cases_per_site"] == {n: {"training": 1, "validation": 1} for n in ("site-kidney", "site-liver")}
    last = manifest["metrics"]["rounds"][-1]
    assert info["metrics"]["round"] == 2 and info["metrics"]["val_dice"] == last["dice"]  # not {} any more
    assert set(info["metrics"]["sites"]) == {"site-kidney", "site-liver"}
    assert info["metrics"]["sites"]["site-liver"]["val_dice"] == {"liver": last["sites"]["site-liver"]["dice-liver"]}
    # FedBN: the global model's own BatchNorm was never trained at any site, so it is not offered; the
    # default is the test-time adaptation the sites' validation cases chose (the threshold question)
    assert "model" not in info["batchnorm_choices"]
    chosen = manifest["metrics"]["threshold_validation"]["batchnorm"]
    assert chosen in ("adapt", "adapt-organs") and info["default_batchnorm"] == chosen
    assert {"adapt", "averaged", "organ:liver", "site:site-kidney"} <= set(info["batchnorm"])
    text = subprocess.check_output(
        [sys.executable, "-m", "SegVizLogic.cli", "model-info", str(bundle)], text=True, encoding="utf-8", timeout=120
    )
    assert "FedBN federation (simulation) of 2 sites, 2 rounds x 1 local epochs, lr 0.005, examples weighting" in text
    assert "site-liver (liver): 1 training, 1 held out for validation" in text
    assert "validation in round 2 (" in text and "before averaging" in text and "hu_window = [-160.0, 240.0]" in text
