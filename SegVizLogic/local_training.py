"""``segviz train``: one site (a local model) or several pooled sites (central training),
with the best validation epoch kept and written as a model bundle."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .bundle import save_bundle
from .errors import SegVizInputError
from .inference import resolve_device
from .network import NetworkConfig, build_network
from .preprocessing import Preprocessing
from .progress import ProgressReporter
from .training import TrainingConfig, load_site_data, seed_everything, train_site

__all__ = ["train_bundle"]


def train_bundle(
    site_dirs: Sequence[str | Path],
    out: str | Path,
    network: NetworkConfig | None = None,
    preprocessing: Preprocessing | None = None,
    training: TrainingConfig | None = None,
    epochs: int = 50,
    lr: float = 1e-3,
    device: str = "auto",
    reporter: ProgressReporter | None = None,
    checkpoint_dir: str | Path | None = None,
    force: bool = False,
    setup_source: str | None = None,
    validate_every: int = 1,
) -> Path:
    """Train on the given sites and write the best-validation model as a bundle.

    One site gives that site's local model; several sites are pooled (``central-partial``
    with the partial-label loss, ``central-naive`` with ``training.label_mode="naive"``).
    Without validation cases (``training.val_fraction = 0``) the last epoch is kept.

    Args:
        setup_source: where the settings came from (``"preset demo with --epochs 1"``), for provenance.
        validate_every: the epochs the best one is chosen among: every ``validate_every``-th and
            the last (1: every epoch; the experiments validate once per round's worth of epochs,
            where a federated arm has its checkpoints).

    Returns:
        The path of the written bundle.
    """
    out = Path(out)
    if out.exists() and not force:
        raise SegVizInputError(out, "already exists; use --force to overwrite")
    if epochs < 1:
        raise SegVizInputError(None, f"--epochs must be >= 1, got {epochs}")
    network = network or NetworkConfig()
    preprocessing = preprocessing or Preprocessing()
    training = training or TrainingConfig()
    reporter = reporter or ProgressReporter("none")
    if any(p % network.divisor for p in training.patch_size):
        raise ValueError(
            f"patch size {training.patch_size} must be a multiple of {network.divisor} (the network's stride product)"
        )
    seed_everything(training.seed)
    torch_device = resolve_device(device)
    sites = [load_site_data(d, preprocessing, training, reporter=reporter) for d in site_dirs]
    model = build_network(network)
    kind = "local" if len(sites) == 1 else ("central-naive" if training.label_mode == "naive" else "central-partial")
    reporter.emit(
        "stage", stage="train", message=f"{kind} training on {', '.join(s.name for s in sites)} ({torch_device.type})"
    )

    history: list[dict] = []
    best = {"score": -1.0, "state": None, "epoch": 0}

    def provenance(epoch: int) -> dict:
        return {
            "strategy": kind,
            "rounds": None,
            "epochs": epoch,
            "lr": lr,
            "sites": [s.name for s in sites],
            "site_organs": {s.name: list(s.organs) for s in sites},
            # Counts only: which cases were held out stays at the site.
            "cases_per_site": {s.name: {"training": len(s.train_items), "validation": len(s.val_items)} for s in sites},
            "setup": setup_source,
            "trained": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch_device.type,
        }

    validated = any(s.val_items for s in sites)

    def on_epoch_end(epoch: int, loss: float, dice: dict[str, float]) -> None:
        # The best mean validation Dice; with no validation case nothing can choose an epoch
        # honestly (the training loss would pick an over-fitted one), so the last one stays.
        score = float(np.mean(list(dice.values()))) if dice else (epoch if not validated else -loss)
        history.append({"epoch": epoch, "loss": loss, "val_dice": dice})
        if score >= best["score"]:
            best.update(score=score, state=copy.deepcopy(model.state_dict()), epoch=epoch)
        if checkpoint_dir is not None:
            save_bundle(
                Path(checkpoint_dir) / f"epoch-{epoch:03d}.segviz",
                model,
                preprocessing,
                provenance(epoch),
                metrics={"history": history},
                training=training.to_dict(),
                force=True,
            )

    train_site(
        model,
        sites,
        epochs=epochs,
        lr=lr,
        device=torch_device,
        reporter=reporter,
        config=training,
        on_epoch_end=on_epoch_end,
        validate_every=validate_every,
    )
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    final = next((h["val_dice"] for h in history if h["epoch"] == best["epoch"]), {})
    return save_bundle(
        out,
        model.cpu(),
        preprocessing,
        provenance(epochs)
        | {
            "best_epoch": best["epoch"],
            "selection": (
                f"best mean validation Dice of the epochs validated (every {validate_every} and the last)"
                if validated and validate_every > 1
                else "best mean validation Dice"
                if validated
                else "last epoch (no validation cases)"
            ),
        },
        metrics={"history": history, "final": {"val_dice": final}},
        training=training.to_dict(),
        trained_organs=sorted({o for s in sites for o in s.organs}),
        force=force,
    )
