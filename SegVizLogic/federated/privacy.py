"""Differential privacy for the SegViz federation: client-side clipping, server-side noise.

What it is: Flower's *central DP with client-side fixed clipping* (Andrew et al. 2019,
McMahan et al. 2018): each site clips its update (what it sends minus what it received) to
L2 norm ``C`` over everything it sends (``shared``, its heads, and ``batchnorm`` under FedAvg);
the coordinator adds Gaussian noise of standard deviation ``z * C / k`` to every average of
``k`` clipped updates (Flower's ``compute_stdv``): ``shared`` over all sites, each
``head:<organ>`` over the sites that annotate the organ. Noise scaled per group by its own
``k`` keeps the noise multiplier of the whole release at ``z`` (one site's clipped update
moves group ``g``'s mean by ``delta_g / k_g`` with ``sum |delta_g|^2 <= C^2``).

Why not Flower's mods as they are: ``fixedclipping_mod`` / ``adaptiveclipping_mod`` and the
``DifferentialPrivacyClientSideFixedClipping`` wrapper accept messages with exactly one
``ArrayRecord`` and one ``ConfigRecord`` and average one flat parameter list with FedAvg.
SegViz messages carry one record per partition group plus ``site``/``config`` records, and
heads are averaged over subsets of sites, so the mods refuse them (``MOD_FAILED_PRECONDITION``).
This module applies Flower's own functions (``compute_clip_model_update``,
``compute_stdv``, ``add_gaussian_noise_inplace``) to the records SegViz averages.

What is protected: the released global model (every round bundle and the final one) with
respect to any one site's whole update (site-level DP). Not covered: the scalar metrics a site
reports (loss, validation Dice, example counts) and the coordinator itself, which sees clipped
but un-noised updates (central DP trusts the aggregator; secure aggregation would be the
complement, see docs/PRIVACY.md). Under FedBN a site's BatchNorm never leaves it; a DP run
therefore never shares the final BatchNorm either. Integer tensors (BatchNorm's
``num_batches_tracked``) are neither clipped nor noised.

Epsilon: :func:`privacy_report` computes the (epsilon, delta) of ``rounds`` releases with
Flower's RDP accountant (no sampling amplification: every site takes part in every round)
when Google's ``dp-accounting`` package is installed, and says so when it is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CLIPPING_NORM_KEY",
    "DifferentialPrivacy",
    "add_group_noise",
    "averaged_group_sizes",
    "clip_update",
    "dp_clipping_mod",
    "privacy_report",
    "update_norm",
]

CLIPPING_NORM_KEY = "dp-clipping-norm"
"""Key of the clipping norm in a train message's ``config`` record (absent: no DP)."""

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DifferentialPrivacy:
    """Privacy parameters of a run.

    Args:
        noise_multiplier: ``z``, noise standard deviation in units of the clipping norm per
            contributing site (> 0).
        clipping_norm: ``C``, the L2 bound of one site's update over everything it sends (> 0).
        delta: the delta at which epsilon is reported.

    Example::

        DifferentialPrivacy(noise_multiplier=0.1, clipping_norm=1.0)
    """

    noise_multiplier: float
    clipping_norm: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not np.isfinite(self.noise_multiplier):
            raise ValueError(f"the DP noise multiplier must be > 0, got {self.noise_multiplier}")
        if not self.clipping_norm > 0 or not np.isfinite(self.clipping_norm):
            raise ValueError(f"the DP clipping norm must be > 0, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


def _float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"]


def update_norm(
    sent: Mapping[str, Mapping[str, np.ndarray]], received: Mapping[str, Mapping[str, np.ndarray]]
) -> float:
    """L2 norm of ``sent - received`` over every floating tensor of the groups both hold."""
    total = 0.0
    for group, arrays in sent.items():
        if group not in received:
            continue
        for key in _float_keys(arrays):
            if key in received[group]:
                diff = np.asarray(arrays[key], np.float64) - np.asarray(received[group][key], np.float64)
                total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def clip_update(
    sent: Mapping[str, Mapping[str, np.ndarray]],
    received: Mapping[str, Mapping[str, np.ndarray]],
    clipping_norm: float,
) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Clip a site's update to ``clipping_norm`` over all groups it sends (Flower's
    ``compute_clip_model_update`` on the concatenation of their floating tensors).

    Returns:
        ``(clipped groups, norm of the update before clipping)``; groups the site did not
        receive and integer tensors pass unchanged.
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update

    out = {g: {k: np.array(v, copy=True) for k, v in arrays.items()} for g, arrays in sent.items()}
    slots = [
        (g, k)
        for g, arrays in out.items()
        if g in received
        for k in _float_keys(arrays)
        if k in received[g] and np.shape(received[g][k]) == np.shape(arrays[k])
    ]
    norm = update_norm({g: {k: out[g][k]} for g, k in slots}, received)
    params = [out[g][k] for g, k in slots]
    compute_clip_model_update(
        params, [np.asarray(received[g][k], params[i].dtype) for i, (g, k) in enumerate(slots)], clipping_norm
    )
    for (g, k), value in zip(slots, params):
        out[g][k] = np.asarray(value, dtype=np.asarray(sent[g][k]).dtype)
    return out, norm


def add_group_noise(
    partition: Mapping[str, Mapping[str, np.ndarray]],
    contributors: Mapping[str, int],
    privacy: DifferentialPrivacy,
    rng: np.random.Generator | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Gaussian noise of std ``z * C / k_g`` on each averaged group ``g`` (``contributors``:
    ``{group: k_g}``; groups with no contributor, and integer tensors, stay as they are).

    Uses Flower's ``compute_stdv`` for the standard deviation; the noise itself is drawn from
    ``rng`` (default: fresh OS entropy; Flower's ``add_gaussian_noise_inplace`` would use
    numpy's global state, which the run's seed fixes, and noise that can be regenerated can be
    subtracted). Tests pass a seeded ``rng``."""
    from flwr.supercore.differential_privacy import compute_stdv

    rng = rng or np.random.default_rng()
    out = {g: {k: np.array(v, copy=True) for k, v in arrays.items()} for g, arrays in partition.items()}
    for group, count in contributors.items():
        if count < 1 or group not in out:
            continue
        std = compute_stdv(privacy.noise_multiplier, privacy.clipping_norm, count)
        for key in _float_keys(out[group]):
            value = out[group][key]
            out[group][key] = (value + rng.normal(0.0, std, value.shape)).astype(value.dtype)
    return out


def averaged_group_sizes(updates: Sequence[Any], strategy: str) -> dict[str, int]:
    """``{group: number of replies averaged into it}`` for one round (the head rule of
    :func:`~SegVizLogic.federated.strategy.aggregate_updates`)."""
    from ..network import HEAD_PREFIX, PARTITION_BATCHNORM, PARTITION_SHARED  # imports torch: not in the ClientApp

    sizes = {PARTITION_SHARED: len(updates)}
    if strategy == "fedavg":
        sizes[PARTITION_BATCHNORM] = len(updates)
    for update in updates:
        for group in update.partition:
            if group.startswith(HEAD_PREFIX) and group[len(HEAD_PREFIX) :] in update.organs:
                sizes[group] = sizes.get(group, 0) + 1
    return sizes


def privacy_report(privacy: DifferentialPrivacy | None, rounds: int, sites: int) -> dict[str, Any]:
    """What a bundle's provenance states about privacy.

    Returns:
        ``{"differential_privacy": False}`` without DP; else the mechanism, ``noise_multiplier``,
        ``clipping_norm``, ``delta``, ``rounds`` and ``epsilon`` (site-level, all ``rounds``
        releases composed with Flower's RDP accountant, no sampling amplification) or, when it
        cannot be computed, ``epsilon: None`` with ``epsilon_note`` saying why.
    """
    if privacy is None:
        return {"differential_privacy": False}
    report: dict[str, Any] = {
        "differential_privacy": True,
        "mechanism": "central DP, client-side fixed clipping (site-level); Gaussian noise z*C/k per averaged group",
        "noise_multiplier": privacy.noise_multiplier,
        "clipping_norm": privacy.clipping_norm,
        "delta": privacy.delta,
        "rounds": rounds,
        "covers": "every released model; not scalar metrics; the coordinator sees clipped, un-noised updates",
    }
    try:
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        population = max(int(sites), 1)
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, population, population), count=rounds)
        report["epsilon"] = float(accountant.get_epsilon(privacy.delta))
    except (ImportError, ModuleNotFoundError, ValueError, RuntimeError) as error:
        report["epsilon"] = None
        report["epsilon_note"] = f"not computed: Flower's RDP accountant needs `pip install dp-accounting` ({error})"
    return report


def dp_clipping_mod(message, context, call_next):
    """Flower client mod: clip this site's reply to the clipping norm the coordinator sent.

    A no-op for messages whose ``config`` record has no ``dp-clipping-norm``. It clips the sum
    of all reply records the site also received (``shared``, heads, ``batchnorm`` under
    FedAvg) against what it received, records the update's norm before clipping in the reply's
    metrics (``dp-update-norm``, so the coordinator can see how often clipping binds), and
    leaves every other record (site, metrics, the final BatchNorm) untouched.
    """
    from .transfer import content_groups, put_groups

    config = message.content.config_records.get("config")
    if config is None or CLIPPING_NORM_KEY not in config:
        return call_next(message, context)
    clipping_norm = float(config[CLIPPING_NORM_KEY])
    received = content_groups(message.content)
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    groups = content_groups(reply.content)
    clipped, norm = clip_update({name: a for name, a in groups.items() if name in received}, received, clipping_norm)
    put_groups(reply.content, {**groups, **clipped})
    if "metrics" in reply.content.metric_records:
        reply.content.metric_records["metrics"]["dp-update-norm"] = float(norm)
    return reply
