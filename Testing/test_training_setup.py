"""Training setups: presets derived from their one source, TOML files, flags over both, and the
settings a bundle records (segviz train with a preset and with a file, then model-info)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from SegVizLogic.bundle_manifest import read_manifest
from SegVizLogic.cli import build_parser, main
from SegVizLogic.errors import SegVizInputError
from SegVizLogic.experiments.config import load_config
from SegVizLogic.training_setup import (
    PRESETS,
    load_preset,
    load_setup_file,
    preset_sections,
    setup_from_args,
    setup_from_sections,
)

REPO = Path(__file__).resolve().parents[1]

# Every section and several fields the old flags could not reach: residual units, validation
# fraction, HU window, body features, exclusion weight.
TINY_SETUP_TOML = """
[network]
channels = [4, 8, 16]
strides = [2, 2]
num_res_units = 0
body_features = 4

[preprocessing]
spacing = [6.0, 6.0, 6.0]
hu_window = [-150.0, 240.0]

[training]
patch_size = [32, 32, 16]
batch_size = 2
samples_per_case = 2
val_fraction = 0.0
exclusion_weight = 0.5
amp = false
seed = 3

[federation]
rounds = 2
local_epochs = 1
lr = 0.004
weighting = "examples"
"""


def test_presets_come_from_the_demo_and_the_experiment_files():
    from SegVizLogic.demo import DemoSettings

    demo, settings = load_preset("demo"), DemoSettings()
    assert settings.setup == demo  # the demo reads the preset: one copy of its numbers
    assert (demo.network.num_res_units, demo.preprocessing.spacing, demo.training.patch_size) == (
        1,
        (4.0,) * 3,
        (48, 48, 32),
    )
    assert settings.training(7).seed == 7 and settings.rounds * settings.local_epochs == demo.total_epochs
    # The demo's phantom: 8 patients a site, 2 held out; 6 training patients x 4 patches in batches of 4 make
    # 6 steps an epoch, 576 a site over the federation's 48 rounds x 2 local epochs.
    from SegVizLogic.training import held_out_case_names

    cases = [f"case{k:03d}" for k in range(settings.cases_per_site)]
    training = len(cases) - len(held_out_case_names(cases, demo.training.val_fraction))
    steps = -(-training * demo.training.samples_per_case // demo.training.batch_size)
    assert (settings.cases_per_site, training, steps * demo.total_epochs) == (8, 6, 576)
    for name in ("cpu", "paper"):
        experiment = load_config(REPO / "experiments" / f"{name}.toml")
        preset = load_preset(name)
        assert preset.network == experiment.network and preset.preprocessing == experiment.preprocessing
        assert preset.training == experiment.training and preset.federation == experiment.federation
    assert set(PRESETS) == {"demo", "cpu", "paper"}


def test_help_shows_every_presets_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    done = capsys.readouterr()
    text = " ".join(done.out.split())  # argparse wraps lines
    paper = load_preset("paper")
    assert "--res-units N residual units per UNet block [demo 1; cpu 1; paper 2]" in text
    expected_patch = ",".join(map(str, paper.training.patch_size))
    assert f"paper {expected_patch}]" in text and "--val-fraction X share of each site" in text
    assert f"paper {paper.total_epochs}]" in text  # --epochs: the budget of the setup


def test_flags_override_the_file_and_channels_bring_their_strides(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_SETUP_TOML, encoding="utf-8")
    args = build_parser().parse_args(
        ["train", "--site", "s", "--out", "o", "--config", str(config), "--lr", "0.01", "--channels", "4,8"]
    )
    setup = setup_from_args(args)
    assert setup.federation.lr == 0.01 and setup.network.channels == (4, 8) and setup.network.strides == (2,)
    assert setup.network.num_res_units == 0 and setup.training.val_fraction == 0.0  # the file's, kept
    assert setup.source == f"config {config} with --channels 4,8 --lr 0.01"
    default = setup_from_args(build_parser().parse_args(["train", "--site", "s", "--out", "o"]))
    assert default.to_dict() == load_preset("paper").to_dict()
    with pytest.raises(SystemExit):  # a preset or a file, not both
        build_parser().parse_args(["train", "--site", "s", "--out", "o", "--preset", "demo", "--config", str(config)])


def test_setup_round_trips_through_its_toml(tmp_path):
    setup = load_preset("demo").override({"training": {"val_fraction": 0.0}, "network": {"num_res_units": 2}})
    path = tmp_path / "again.toml"
    path.write_text(setup.to_toml(), encoding="utf-8")
    assert load_setup_file(path).to_dict() == setup.to_dict()
    # an experiment file is a valid setup file: its data, arms and seeds are ignored
    assert (
        load_setup_file(REPO / "experiments" / "ci.toml").network
        == load_config(REPO / "experiments" / "ci.toml").network
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[training]\nbatchsize = 2\n", "unknown training config keys: ['batchsize']"),
        ("[federation]\nepochs = 2\n", "unknown [federation] keys ['epochs']"),
        ("[network]\nchannels = [4, 8]\nstrides = [2, 2]\n", "strides"),
        ("[training]\npatch_size = [30, 32, 32]\n", "multiple of 16"),
        ("[trianing]\nseed = 1\n", "unknown top-level keys ['trianing']"),
        ("[training\n", "invalid TOML"),
    ],
)
def test_bad_setup_files_are_refused_with_the_file_name(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SegVizInputError, match=r"bad\.toml: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        load_setup_file(path)


def test_bad_setup_on_the_command_line_is_one_line(tmp_path, capsys):
    code = main(
        [
            "train",
            "--site",
            str(tmp_path),
            "--out",
            str(tmp_path / "m.segviz"),
            "--preset",
            "demo",
            "--val-fraction",
            "1.5",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val_fraction in [0, 1)" in err[0]
    assert not (tmp_path / "m.segviz").exists()


def _recorded(bundle: Path) -> dict:
    manifest = read_manifest(bundle)
    training = dict(manifest["training"])
    return {"network": manifest["network"], "preprocessing": manifest["preprocessing"], "training": training}


def test_train_with_a_preset_records_the_presets_settings(small_phantom, tmp_path):
    out = tmp_path / "demo.segviz"
    code = main(
        ["train", "--site", str(small_phantom.sites[0]), "--out", str(out), "--preset", "demo", "--epochs", "1"]
        + ["--device", "cpu", "--progress", "none"]
    )
    assert code == 0
    preset = load_preset("demo").to_dict()
    assert _recorded(out) == {k: preset[k] for k in ("network", "preprocessing", "training")}
    provenance = read_manifest(out)["provenance"]
    assert provenance["lr"] == preset["federation"]["lr"] and provenance["epochs"] == 1
    assert provenance["setup"] == "preset demo" and provenance["cases_per_site"] == {
        "site-liver": {"training": 2, "validation": 1}
    }


def test_train_with_a_config_file_records_it_and_model_info_shows_it(small_phantom, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_SETUP_TOML, encoding="utf-8")
    out = tmp_path / "central.segviz"
    sites = [str(small_phantom.sites[0]), "--site", str(small_phantom.sites[1])]
    code = main(
        ["train", "--site", *sites, "--out", str(out), "--config", str(config), "--device", "cpu", "--progress", "none"]
    )
    assert code == 0
    setup = setup_from_sections(tomllib.loads(TINY_SETUP_TOML)).to_dict()
    assert _recorded(out) == {k: setup[k] for k in ("network", "preprocessing", "training")}
    provenance = read_manifest(out)["provenance"]
    assert provenance["epochs"] == 2 and provenance["lr"] == 0.004  # rounds x local_epochs, the file's lr
    # val_fraction 0: every case trains, and the last epoch is kept (nothing to choose with)
    assert provenance["cases_per_site"] == {n: {"training": 3, "validation": 0} for n in ("site-liver", "site-spleen")}
    assert provenance["best_epoch"] == 2 and provenance["selection"] == "last epoch (no validation cases)"

    capsys.readouterr()
    assert main(["model-info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["setup"]["network"]["num_res_units"] == 0 and info["setup"]["training"]["val_fraction"] == 0.0
    assert info["budget"] == {"epochs": 2, "lr": 0.004} and info["strategy"] == "central-partial"
    assert info["batchnorm_choices"] == ["model", "adapt", "adapt-organs"]
    assert set(info["batchnorm"]) == {"model", "adapt", "adapt-organs"}
    assert main(["model-info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "num_res_units = 0" in text and "hu_window = [-150.0, 240.0]" in text
    assert "site-spleen (spleen): 3 training, 0 held out for validation" in text
    assert f"setup          config {config}" in text


def test_preset_sections_of_a_missing_file_name_the_way_out(monkeypatch, tmp_path):
    from SegVizLogic import training_setup

    monkeypatch.setattr(training_setup, "_experiment_folders", lambda: [tmp_path])
    with pytest.raises(SegVizInputError, match="preset 'cpu' reads experiments/cpu.toml.*--config FILE.toml"):
        preset_sections("cpu")
    assert preset_sections("demo")["training"]["patch_size"] == [48, 48, 32]  # no file needed


def test_the_readme_setup_file_is_a_valid_setup(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.toml"
    path.write_text(block, encoding="utf-8")
    setup = load_setup_file(path)
    assert setup.network.num_res_units == 1 and setup.total_epochs == 72 and setup.training.val_fraction == 0.25
