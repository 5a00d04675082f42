"""Training the arms of the comparison (no evaluation here: the external set is not in reach).

Every arm trains on the same sites with the same network, preprocessing, patch sampling,
learning rate and budget (``rounds × local_epochs`` epochs):

- ``local``: one model per site on its own organs (:func:`~SegVizLogic.local_training.train_bundle`),
  kept at its best validation epoch;
- ``central-naive``: all sites pooled, one softmax model, unannotated organs as background;
- ``central-partial``: all sites pooled, the partial-label loss;
- ``fedavg`` / ``fedbn``: the federated code path
  (:func:`~SegVizLogic.federated.simulation.run_federated_simulation`, in Flower's simulation engine
  or, without Ray, its deployment engine: ``engine`` in the config); every round's bundle is kept
  so a checkpoint can be chosen on validation.

What an arm's models are then scored with (BatchNorm, overlap, threshold, checkpoint) is chosen on
the sites' validation cases by :mod:`~SegVizLogic.experiments.selection`; only after that choice is
frozen does :mod:`~SegVizLogic.experiments.external` open the external set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..local_training import train_bundle
from ..progress import ProgressReporter
from ..site import load_site
from .config import ExperimentConfig

__all__ = ["BEST_EPOCH", "FINAL_ROUND", "TrainedArm", "prepare_data", "train_arm", "train_arms"]

BEST_EPOCH = "best-epoch"
"""Checkpoint label of a local or central model: its best validation epoch (chosen during training)."""
FINAL_ROUND = "final"
"""Checkpoint label of a federated model's last round."""


@dataclass
class TrainedArm:
    """The models one arm trained for one seed.

    Args:
        arm: the arm (``local``, ``central-naive``, ``central-partial``, ``fedavg``, ``fedbn``).
        seed: the training seed.
        models: model name -> ``{checkpoint label: bundle path}``. One model per arm
            (named like the arm), except ``local``: ``local:<site>`` per site.
        model_sites: model name -> the sites it trained on (which validation cases it can be judged on).
        rounds: per-round metrics of a federated run (``bundle.metrics["rounds"]``).
        seconds: training time.
        epochs: local epochs per round and rounds this arm trained (budget record).
    """

    arm: str
    seed: int
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    model_sites: dict[str, list[str]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epochs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (results.json)."""
        return {
            "arm": self.arm,
            "seed": self.seed,
            "models": self.models,
            "model_sites": self.model_sites,
            "seconds": round(self.seconds, 1),
            "epochs": self.epochs,
        }


def prepare_data(config: ExperimentConfig, out_dir: str | Path, reporter: ProgressReporter) -> tuple[list[str], str]:
    """The training site folders and the external site folder (its path only: nothing in it is read).

    A phantom is written to ``[data] phantom_dir`` (default ``out_dir/data``); an existing
    phantom there is reused when its ``phantom.json`` has the same size, seed and case counts
    (a full-size phantom takes many minutes to write; its preprocessing cache is reused too).
    A learning curve needs ``max(cases) + validation_cases`` cases per site; that is the default.

    Returns:
        ``(site_dirs, external_dir)``.
    """
    if config.data.phantom is None:
        return list(config.data.sites), str(config.data.external)
    from ..phantom import EXTERNAL_NAME, PAPER_SITES, generate_phantom_sites

    phantom = {"size": "small", "seed": 0, **config.data.phantom}
    size = phantom["size"]
    curve = config.learning_curve
    if phantom.get("cases_per_site") is None and curve is not None:
        phantom["cases_per_site"] = curve.max_cases + curve.validation_cases
    n_site = phantom.get("cases_per_site") or (4 if size == "small" else 12)
    n_ext = phantom.get("external_cases") or (4 if size == "small" else 8)
    root = Path(config.data.phantom_dir) if config.data.phantom_dir else Path(out_dir) / "data"
    sites = [str(root / name) for name, _ in PAPER_SITES]
    try:
        # Only phantom.json, beside the sites: the external folder itself is not looked into.
        manifest = json.loads((root / "phantom.json").read_text(encoding="utf-8"))
        counts = {name: info["cases"] for name, info in manifest["sites"].items()}
        if (manifest["size"], manifest["seed"]) == (size, phantom["seed"]) and counts == {
            **{n: n_site for n, _ in PAPER_SITES},
            EXTERNAL_NAME: n_ext,
        }:
            reporter.emit("stage", stage="phantom", message=f"reusing the phantom in {root}")
            return sites, str(root / EXTERNAL_NAME)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    reporter.emit("stage", stage="phantom", message=f"writing phantom sites ({phantom}) to {root}")
    layout = generate_phantom_sites(root, force=True, progress=reporter, **phantom)
    return [str(s) for s in layout.sites], str(layout.external)


def _train_config(config: ExperimentConfig, seed: int, naive: bool = False):
    return replace(config.training, seed=seed, label_mode="naive" if naive else "partial")


def _enable_gpu_in_ray(device: str) -> None:
    """Let Flower's Ray actors see the GPU.

    Ray hides every GPU from an actor that asked for none (``CUDA_VISIBLE_DEVICES=""``), and the
    simulation asks for none, so the sites would train on the CPU; this opt-out keeps the
    driver's devices visible (one site trains at a time).
    """
    if device != "cpu" and torch.cuda.is_available():
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        os.environ.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")


def _federated_checkpoints(arm_dir: Path, config: ExperimentConfig) -> dict[str, str]:
    from ..federated.server_app import FINAL_BUNDLE, round_bundle_name

    rounds = config.federation.rounds
    checkpoints = {}
    for label in config.selection.checkpoints:
        if label == FINAL_ROUND or label == rounds:
            checkpoints[FINAL_ROUND] = str(arm_dir / FINAL_BUNDLE)
        else:
            checkpoints[f"round-{label}"] = str(arm_dir / round_bundle_name(int(label)))
    return checkpoints


def train_arm(
    arm: str,
    config: ExperimentConfig,
    site_dirs: Sequence[str],
    arm_dir: str | Path,
    seed: int,
    reporter: ProgressReporter | None = None,
    local_epochs: int | None = None,
) -> TrainedArm:
    """Train one arm for one seed; bundles go to ``arm_dir``.

    Args:
        arm: one of :data:`~SegVizLogic.experiments.config.ARMS`.
        config: the experiment.
        site_dirs: training site folders.
        arm_dir: output folder of this arm (created).
        seed: training seed (model initialisation, patch sampling).
        reporter: progress.
        local_epochs: overrides ``[federation] local_epochs`` (a learning curve's step budget);
            local and central arms train ``rounds × local_epochs`` epochs either way.

    Returns:
        The arm's :class:`TrainedArm`.
    """
    reporter = reporter or ProgressReporter("none")
    arm_dir = Path(arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    rounds = config.federation.rounds
    local_epochs = local_epochs or config.federation.local_epochs
    epochs = rounds * local_epochs
    lr = config.federation.lr
    trained = TrainedArm(arm=arm, seed=seed, epochs={"rounds": rounds, "local_epochs": local_epochs})
    start = time.perf_counter()

    def central(sites: Sequence[str], path: Path, naive: bool) -> str:
        return str(
            train_bundle(
                sites,
                path,
                network=replace(config.network, output="softmax" if naive else "sigmoid"),
                preprocessing=config.preprocessing,
                training=_train_config(config, seed, naive=naive),
                epochs=epochs,
                lr=lr,
                device=config.device,
                reporter=reporter,
                force=True,
                # Checkpoints where a federated arm has them: after every round's worth of epochs.
                validate_every=local_epochs,
            )
        )

    runners: dict[str, Callable[[], None]] = {}

    def run_local() -> None:
        for site_dir in site_dirs:
            site = load_site(site_dir)
            name = f"local:{site.name}"
            trained.models[name] = {BEST_EPOCH: central([site_dir], arm_dir / f"{site.name}.segviz", naive=False)}
            trained.model_sites[name] = [site.name]

    def run_central() -> None:
        trained.models[arm] = {BEST_EPOCH: central(site_dirs, arm_dir / "model.segviz", naive=arm == "central-naive")}
        trained.model_sites[arm] = [load_site(s).name for s in site_dirs]

    def run_federated() -> None:
        from ..federated.simulation import run_federated_simulation

        _enable_gpu_in_ray(config.device)
        final = run_federated_simulation(
            list(site_dirs),
            arm_dir,
            rounds=rounds,
            local_epochs=local_epochs,
            strategy=arm,
            weighting=config.federation.weighting,
            lr=lr,
            preprocessing=config.preprocessing,
            training_config=_train_config(config, seed),
            network_config=replace(config.network, output="sigmoid"),
            reporter=reporter,
            seed=seed,
            device=config.device,
            engine=config.engine,
            # Every arm's threshold is chosen by the comparison's own rule (selection.py), the same way.
            choose_threshold=False,
        )
        from ..bundle_manifest import read_manifest

        trained.models[arm] = _federated_checkpoints(arm_dir, config)
        trained.model_sites[arm] = [load_site(s).name for s in site_dirs]
        trained.rounds = list(read_manifest(final).get("metrics", {}).get("rounds", []))

    runners = {
        "local": run_local,
        "central-naive": run_central,
        "central-partial": run_central,
        "fedavg": run_federated,
        "fedbn": run_federated,
    }
    if arm not in runners:
        raise ValueError(f"unknown arm {arm!r}")
    runners[arm]()
    trained.seconds = time.perf_counter() - start
    return trained


def train_arms(
    config: ExperimentConfig,
    site_dirs: Sequence[str],
    out_dir: str | Path,
    reporter: ProgressReporter | None = None,
    local_epochs: int | None = None,
) -> list[TrainedArm]:
    """Every arm of ``config`` for every seed; bundles under ``out_dir/seed-<seed>/<arm>/``."""
    reporter = reporter or ProgressReporter("none")
    trained = []
    epochs = config.federation.rounds * (local_epochs or config.federation.local_epochs)
    for seed in config.seeds:
        for arm in config.arms:
            reporter.emit("stage", stage="arm", message=f"seed {seed}: training {arm} ({epochs} epochs)")
            trained.append(
                train_arm(arm, config, site_dirs, Path(out_dir) / f"seed-{seed}" / arm, seed, reporter, local_epochs)
            )
    return trained
