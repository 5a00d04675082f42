"""The tiny network, preprocessing and training of the federated tests (imported by name: a
module called ``conftest`` would be whichever conftest.py pytest loaded last)."""

from __future__ import annotations

from SegVizLogic.network import NetworkConfig
from SegVizLogic.preprocessing import Preprocessing

__all__ = ["SITE_NAMES", "TINY_NETWORK", "TINY_PREPROCESSING", "tiny_run_options", "tiny_training"]

TINY_NETWORK = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, body_features=4)
TINY_PREPROCESSING = Preprocessing(spacing=(6.0, 6.0, 6.0))
SITE_NAMES = ("site-liver", "site-spleen", "site-kidney")


def tiny_training(seed: int = 0):
    """A training config that makes one optimiser step per epoch on a 2-case phantom site."""
    from SegVizLogic.training import TrainingConfig

    return TrainingConfig(patch_size=(32, 32, 16), batch_size=2, samples_per_case=2, amp=False, seed=seed)


def tiny_run_options(**overrides) -> dict:
    """``run_federated_simulation`` keywords of a 2-round tiny FedBN run (seed 0, CPU, quiet)."""
    from SegVizLogic.progress import ProgressReporter

    options = {
        "rounds": 2,
        "local_epochs": 1,
        "strategy": "fedbn",
        "weighting": "uniform",
        "lr": 1e-2,
        "preprocessing": TINY_PREPROCESSING,
        "training_config": tiny_training(),
        "network_config": TINY_NETWORK,
        "reporter": ProgressReporter("none"),
        "seed": 0,
        "device": "cpu",
    }
    return {**options, **overrides}
