"""Training and external evaluation of each arm of the comparison.

Every arm trains on the same sites with the same network, preprocessing, patch sampling,
learning rate and budget (``rounds × local_epochs`` epochs), and is scored on the same
fully-labelled external site with :func:`~SegVizLogic.external_evaluation.evaluate_on_site`:

- ``local``: one model per site on its own organs (:func:`~SegVizLogic.local_training.train_bundle`);
  each model is scored only on the organs it was taught (an organ several sites annotated gets
  the mean of their models, per case; each model is also kept as ``local:<site>``);
- ``central-naive``: all sites pooled, one softmax model, unannotated organs as background;
- ``central-partial``: all sites pooled, the partial-label loss;
- ``fedavg`` / ``fedbn``: the federated code path
  (:func:`~SegVizLogic.federated.simulation.run_federated_simulation`); the FedBN model is
  scored with its bundle's default BatchNorm as ``fedbn`` and with every measured BatchNorm
  choice as ``fedbn[bn=<choice>]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..bundle import ModelBundle, load_bundle
from ..external_evaluation import ExternalResult, evaluate_on_site
from ..inference import resolve_device
from ..local_training import train_bundle
from ..organs import organ_by_name
from ..progress import ProgressReporter
from ..site import load_site
from .config import ExperimentConfig

__all__ = ["ArmOutcome", "batchnorm_to_measure", "bn_arm_name", "prepare_data", "run_arm", "run_seed"]


def bn_arm_name(choice: str) -> str:
    """Row name of the FedBN model evaluated with BatchNorm ``choice`` (``fedbn[bn=adapt]``)."""
    return f"fedbn[bn={choice}]"


@dataclass
class ArmOutcome:
    """What one arm of one seed produced.

    Args:
        arm: the arm (``local``, ``central-naive``, ``central-partial``, ``fedavg``, ``fedbn``).
        seed: the training seed.
        records: per (row, case, organ) scores: ``{"arm", "seed", "case", "organ", "dice", "hd95_mm", "status"}``;
            ``arm`` is the table row (``fedbn[bn=adapt]``, ``local:site-liver``...).
        bundles: model name -> bundle path.
        seconds: training and evaluation time.
        overlay: ``(case, label map)`` of one external case per row (figures).
        rounds: per-round metrics of a federated run (``bundle.metrics["rounds"]``).
        default_batchnorm: the FedBN bundle's default BatchNorm choice.
    """

    arm: str
    seed: int
    records: list[dict] = field(default_factory=list)
    bundles: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    overlay: dict[str, tuple[str, sitk.Image]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    default_batchnorm: str | None = None


def prepare_data(config: ExperimentConfig, out_dir: str | Path, reporter: ProgressReporter) -> tuple[list[str], str]:
    """The training site folders and the external site folder.

    A phantom is written to ``[data] phantom_dir`` (default ``out_dir/data``); an existing
    phantom there is reused when its ``phantom.json`` has the same size, seed and case counts
    (a full-size phantom takes many minutes to write; its preprocessing cache is reused too).

    Returns:
        ``(site_dirs, external_dir)``.
    """
    if config.data.phantom is None:
        return list(config.data.sites), str(config.data.external)
    import json

    from ..phantom import EXTERNAL_NAME, PAPER_SITES, generate_phantom_sites

    phantom = {"size": "small", "seed": 0, **config.data.phantom}
    size = phantom["size"]
    n_site = phantom.get("cases_per_site") or (4 if size == "small" else 12)
    n_ext = phantom.get("external_cases") or (4 if size == "small" else 8)
    root = Path(config.data.phantom_dir) if config.data.phantom_dir else Path(out_dir) / "data"
    sites = [str(root / name) for name, _ in PAPER_SITES]
    try:
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


def _records(arm: str, seed: int, result: ExternalResult, organs: Sequence[str]) -> list[dict]:
    rows = []
    for case, scores in sorted(result.per_case.items()):
        for organ in organs:
            score = scores.get(organ)
            if score is None or score.get("dice") is None:
                continue  # organ absent from this case's reference
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "case": case,
                    "organ": organ,
                    "dice": score["dice"],
                    "hd95_mm": score.get("hd95_mm"),
                    "status": score.get("status"),
                }
            )
    return rows


def _first_prediction(result: ExternalResult) -> tuple[str, sitk.Image] | None:
    if not result.predictions:
        return None
    case = min(result.predictions)
    return case, result.predictions[case]


def _evaluate(
    bundle: ModelBundle,
    external: str,
    device: torch.device,
    config: ExperimentConfig,
    reporter: ProgressReporter,
    batchnorm: str | None = None,
    hd95: bool | None = None,
) -> ExternalResult:
    hd95 = config.hd95 if hd95 is None else hd95
    result = evaluate_on_site(
        bundle, external, device, batchnorm=batchnorm, reporter=reporter, keep_predictions=True, hd95=hd95
    )
    first = _first_prediction(result)
    result.predictions = dict([first]) if first else {}  # keep one case for the overlay figure, not all
    return result


def batchnorm_to_measure(bundle: ModelBundle, wanted: Sequence[str]) -> list[str]:
    """The BatchNorm choices of ``bundle`` to evaluate: ``wanted`` (``"all"`` = every choice) that the bundle can build
    (including controls inference does not offer, such as a FedBN model's untrained ``model`` BatchNorm)."""
    from ..bundle_manifest import buildable_batchnorm

    available = buildable_batchnorm(bundle.manifest)
    if "all" in wanted:
        return available
    return [c for c in wanted if c in available]


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


def run_arm(
    arm: str,
    config: ExperimentConfig,
    site_dirs: Sequence[str],
    external: str,
    arm_dir: str | Path,
    seed: int,
    reporter: ProgressReporter | None = None,
) -> ArmOutcome:
    """Train and evaluate one arm for one seed; bundles go to ``arm_dir``.

    Args:
        arm: one of :data:`~SegVizLogic.experiments.config.ARMS`.
        config: the experiment.
        site_dirs: training site folders.
        external: the fully-labelled external site folder.
        arm_dir: output folder of this arm (created).
        seed: training seed (model initialisation, patch sampling).
        reporter: progress.

    Returns:
        The arm's :class:`ArmOutcome`.
    """
    reporter = reporter or ProgressReporter("none")
    arm_dir = Path(arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    epochs = config.federation.total_epochs
    lr = config.federation.lr
    outcome = ArmOutcome(arm=arm, seed=seed)

    def timed(key: str, fn: Callable):
        start = time.perf_counter()
        value = fn()
        outcome.seconds[key] = round(outcome.seconds.get(key, 0.0) + time.perf_counter() - start, 2)
        return value

    if arm == "local":
        per_key: dict[tuple, list[dict]] = {}
        composite: dict[str, np.ndarray] = {}
        overlay_case, overlay_ref = None, None
        for site_dir in site_dirs:
            site = load_site(site_dir)
            name = f"local:{site.name}"
            path = timed(
                "train",
                lambda site_dir=site_dir, site=site: train_bundle(
                    [site_dir],
                    arm_dir / f"{site.name}.segviz",
                    network=replace(config.network, output="sigmoid"),
                    preprocessing=config.preprocessing,
                    training=_train_config(config, seed),
                    epochs=epochs,
                    lr=lr,
                    device=config.device,
                    reporter=reporter,
                    force=True,
                ),
            )
            bundle = load_bundle(path)
            outcome.bundles[name] = str(path)
            result = timed("evaluate", lambda bundle=bundle: _evaluate(bundle, external, device, config, reporter))
            rows = _records(name, seed, result, bundle.trained_organs)
            outcome.records += rows
            for row in rows:
                per_key.setdefault((row["case"], row["organ"]), []).append(row)
            first = _first_prediction(result)
            if first:
                # The "local" overlay: each organ as its own site's model predicts it.
                overlay_case, image = first
                labels = sitk.GetArrayFromImage(image)
                if overlay_ref is None:
                    overlay_ref = image
                for organ in bundle.trained_organs:
                    composite[organ] = labels == organ_by_name(organ).label
        for (case, organ), rows in sorted(per_key.items()):
            hd = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
            outcome.records.append(
                {
                    "arm": "local",
                    "seed": seed,
                    "case": case,
                    "organ": organ,
                    "dice": float(np.mean([r["dice"] for r in rows])),
                    "hd95_mm": float(np.mean(hd)) if hd else None,
                    "status": "mean of " + ", ".join(r["arm"] for r in rows) if len(rows) > 1 else rows[0]["status"],
                }
            )
        if overlay_ref is not None:
            labels = np.zeros(sitk.GetArrayViewFromImage(overlay_ref).shape, np.uint8)
            for organ, mask in composite.items():
                labels[mask & (labels == 0)] = organ_by_name(organ).label
            image = sitk.GetImageFromArray(labels)
            image.CopyInformation(overlay_ref)
            outcome.overlay["local"] = (overlay_case, image)
        return outcome

    if arm in ("central-naive", "central-partial"):
        naive = arm == "central-naive"
        network = replace(config.network, output="softmax" if naive else "sigmoid")
        path = timed(
            "train",
            lambda: train_bundle(
                site_dirs,
                arm_dir / "model.segviz",
                network=network,
                preprocessing=config.preprocessing,
                training=_train_config(config, seed, naive=naive),
                epochs=epochs,
                lr=lr,
                device=config.device,
                reporter=reporter,
                force=True,
            ),
        )
        bundle = load_bundle(path)
        outcome.bundles[arm] = str(path)
        result = timed("evaluate", lambda: _evaluate(bundle, external, device, config, reporter))
        outcome.records += _records(arm, seed, result, bundle.trained_organs)
        if (first := _first_prediction(result)) is not None:
            outcome.overlay[arm] = first
        return outcome

    if arm in ("fedavg", "fedbn"):
        from ..federated.simulation import run_federated_simulation

        _enable_gpu_in_ray(config.device)
        path = timed(
            "train",
            lambda: run_federated_simulation(
                list(site_dirs),
                arm_dir,
                rounds=config.federation.rounds,
                local_epochs=config.federation.local_epochs,
                strategy=arm,
                weighting=config.federation.weighting,
                lr=lr,
                preprocessing=config.preprocessing,
                training_config=_train_config(config, seed),
                network_config=replace(config.network, output="sigmoid"),
                reporter=reporter,
                seed=seed,
                device=config.device,
            ),
        )
        bundle = load_bundle(path)
        outcome.bundles[arm] = str(path)
        outcome.rounds = list(bundle.metrics.get("rounds", []))
        outcome.default_batchnorm = bundle.default_batchnorm
        result = timed("evaluate", lambda: _evaluate(bundle, external, device, config, reporter))
        outcome.records += _records(arm, seed, result, bundle.trained_organs)
        if (first := _first_prediction(result)) is not None:
            outcome.overlay[arm] = first
        if arm == "fedbn":
            for choice in batchnorm_to_measure(bundle, config.batchnorm):
                reporter.emit(
                    "stage",
                    stage="batchnorm",
                    message=f"seed {seed}: FedBN model with BatchNorm {choice!r} at the external site",
                )
                if choice == bundle.default_batchnorm:
                    rows = [
                        {**r, "arm": bn_arm_name(choice), "hd95_mm": None} for r in outcome.records if r["arm"] == arm
                    ]
                else:
                    # Dice decides the BatchNorm default; HD95 (seconds per full-size case) only for the main rows.
                    choice_result = timed(
                        "evaluate",
                        lambda choice=choice: _evaluate(
                            bundle, external, device, config, reporter, batchnorm=choice, hd95=False
                        ),
                    )
                    rows = _records(bn_arm_name(choice), seed, choice_result, bundle.trained_organs)
                outcome.records += rows
        return outcome

    raise ValueError(f"unknown arm {arm!r}")


def run_seed(
    config: ExperimentConfig,
    site_dirs: Sequence[str],
    external: str,
    out_dir: str | Path,
    seed: int,
    reporter: ProgressReporter | None = None,
) -> list[ArmOutcome]:
    """Every arm of ``config`` for one seed; bundles under ``out_dir/seed-<seed>/<arm>/``."""
    reporter = reporter or ProgressReporter("none")
    outcomes = []
    for arm in config.arms:
        reporter.emit("stage", stage="arm", message=f"seed {seed}: {arm} ({config.federation.total_epochs} epochs)")
        outcomes.append(run_arm(arm, config, site_dirs, external, Path(out_dir) / f"seed-{seed}" / arm, seed, reporter))
    return outcomes
