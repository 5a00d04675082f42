"""SegViz federated task: run settings, message records, and one site's training round."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..network import HEAD_PREFIX, PARTITION_BATCHNORM, PARTITION_SHARED, NetworkConfig, build_network, partition_state
from ..preprocessing import Preprocessing
from ..progress import ProgressReporter
from . import AVERAGED_BATCHNORM_RECORD, LOCAL_STATE_DIR
from .strategy import HEAD_AGGREGATIONS, STRATEGIES, WEIGHTINGS, Partition

__all__ = [
    "APP_CONFIG_DEFAULTS",
    "LOCAL_STATE_DIR",
    "ClientRoundResult",
    "FederationSettings",
    "load_local_batchnorm",
    "load_partition_into_model",
    "local_state_dir",
    "new_lineage",
    "save_local_batchnorm",
    "score_thresholds_on_site",
    "train_client_round",
]

# Mirrors [tool.flwr.app.config] in pyproject.toml (a test keeps them equal): the deployment
# ServerApp reads these keys from ``context.run_config``; simulation builds the same settings
# in Python because ``run_simulation`` gives the ServerApp an empty run config.
APP_CONFIG_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "local-epochs": 2,
    "lr": 0.001,
    "strategy": "fedbn",
    "weighting": "uniform",
    "head-aggregation": "annotating",
    "min-clients": 2,
    "round-timeout": 3600,
    "out-dir": "",
    "share-final-batchnorm": True,
    "default-batchnorm": "auto",
    "seed": 0,
    "network-config": "",
    "training-config": "",
    "preprocessing": "",
    "resume-from": "",
    "wait-timeout": 600,
    "signing-key": "",
    "dp-noise-multiplier": 0.0,
    "dp-clipping-norm": 0.0,
    "fraction-train": 1.0,
    "min-train-nodes": 0,
    "round-deadline": 0.0,
    "transfer-dtype": "float32",
    "choose-threshold": True,
}

_STATE_BATCHNORM = "segviz-batchnorm"
_STATE_INFO = "segviz-batchnorm-info"


def _json_or_empty(text: str | Mapping | None) -> dict:
    if not text:
        return {}
    return dict(text) if isinstance(text, Mapping) else json.loads(text)


@dataclass
class FederationSettings:
    """Everything one federated run needs, on the server side.

    The ServerApp sends the client-relevant part to every site in each train message's
    ``config`` record (:meth:`client_config`), so clients need nothing but their site folder.

    Args:
        rounds: federated rounds.
        local_epochs: epochs each site trains per round.
        lr: local learning rate.
        strategy: ``"fedbn"`` or ``"fedavg"``.
        weighting: ``"examples"`` or ``"uniform"`` (the paper's choice).
        head_aggregation: how an organ's head is averaged (see
            :func:`~SegVizLogic.federated.strategy.aggregate_updates`): ``"annotating"`` (only
            the sites that annotate the organ reply with it) or ``"evidence"`` (every site that
            taught it anything replies with it, the exclusion term's "not this organ" included,
            weighted by the voxels it was taught on).
        min_clients: sites that must be connected before a round starts; when every site trains
            (``fraction_train = 1``) also the usable replies a round needs to aggregate.
        round_timeout: seconds to wait for a round's replies.
        wait_timeout: seconds to wait for ``min_clients`` sites to connect.
        out_dir: where bundles and ``progress.jsonl`` go.
        share_final_batchnorm: each site sends its BatchNorm once, with its final-round reply,
            so the final bundle carries ``averaged`` / ``organ:*`` / ``site:*`` BatchNorm for
            sites that never trained (what SegViz evaluation needs). ``False`` keeps BatchNorm
            strictly on site; ``adapt`` then re-estimates the statistics on the input alone.
        default_batchnorm: the bundle's default BatchNorm; ``"auto"`` is ``model`` under FedAvg
            and :data:`~SegVizLogic.bundle.FEDBN_DEFAULT_BATCHNORM` under FedBN (chosen on the
            sites' validation cases, docs/METHOD.md); the shared ``averaged`` / ``organ:*`` /
            ``site:*`` variants stay selectable.
        seed: seeds the global model's initialisation and the sites' patch sampling.
        network: network configuration.
        training: local training configuration (``TrainingConfig.to_dict()``).
        preprocessing: preprocessing of every site.
        resume_from: a bundle to start from (its weights; sites resume their BatchNorm).
        signing_key: path of the federation's ``federation.key`` on the coordinator; the ServerApp
            signs every bundle with it (the path travels in the run config, never the key).
        dp_noise_multiplier: differential privacy's noise multiplier ``z`` (0: no DP); see
            :mod:`~SegVizLogic.federated.privacy`. DP needs uniform weighting and never shares
            the final BatchNorm (``share_final_batchnorm`` is switched off).
        dp_clipping_norm: differential privacy's clipping norm ``C`` (0: no DP).
        choose_threshold: after the final round, ask every connected site to score the final model on
            its held-out validation cases at each candidate organ threshold (one network pass a
            case; the reply holds Dice sums and case counts only) and write the threshold the
            sites' validation prefers into the final bundle (:mod:`SegVizLogic.threshold_selection`'s
            rule). Off under differential privacy; a run with no usable answer keeps 0.5.
        fraction_train: share of the connected sites trained each round (1: all), sampled
            with the run's seed (:func:`~SegVizLogic.federated.sampling.sample_nodes`).
        min_train_nodes: with ``fraction_train < 1``, at least this many sites are sampled and
            this many usable replies are needed (0: ``min_clients``; never more than it).
        round_deadline: seconds a round waits for more replies once it has the usable replies
            it needs (:attr:`replies_needed`); later replies are dropped and named (0: wait for
            every site up to ``round_timeout``).
        transfer_dtype: ``"float32"``, or ``"float16"`` to send the shared body both ways in
            half precision (heads, BatchNorm and the coordinator's master weights stay float32).
    """

    rounds: int = 3
    local_epochs: int = 2
    lr: float = 1e-3
    strategy: str = "fedbn"
    weighting: str = "uniform"
    head_aggregation: str = "annotating"
    min_clients: int = 2
    round_timeout: float = 3600.0
    wait_timeout: float = 600.0
    out_dir: str = ""
    share_final_batchnorm: bool = True
    default_batchnorm: str = "auto"
    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: dict = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    resume_from: str = ""
    signing_key: str = ""
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.0
    fraction_train: float = 1.0
    min_train_nodes: int = 0
    round_deadline: float = 0.0
    transfer_dtype: str = "float32"
    choose_threshold: bool = True

    def __post_init__(self) -> None:
        from .transfer import TRANSFER_DTYPES

        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.min_train_nodes < 0 or self.round_deadline < 0:
            raise ValueError(
                f"min-train-nodes and round-deadline must be >= 0, got {self.min_train_nodes} and {self.round_deadline}"
            )
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"transfer-dtype must be one of {', '.join(TRANSFER_DTYPES)}, got {self.transfer_dtype!r}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local epochs must be >= 1, got {self.rounds} and {self.local_epochs}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise ValueError(
                f"head aggregation must be one of {', '.join(HEAD_AGGREGATIONS)}, got {self.head_aggregation!r}"
            )
        if self.lr <= 0 or self.min_clients < 1:
            raise ValueError(f"lr must be > 0 and min-clients >= 1, got {self.lr} and {self.min_clients}")
        if (self.dp_noise_multiplier > 0) != (self.dp_clipping_norm > 0):
            raise ValueError(
                "differential privacy needs both a noise multiplier and a clipping norm > 0, got "
                f"{self.dp_noise_multiplier} and {self.dp_clipping_norm}"
            )
        if self.privacy is not None:
            if self.weighting != "uniform":
                raise ValueError("differential privacy needs uniform weighting (a site's weight bounds its influence)")
            self.share_final_batchnorm = False  # BatchNorm statistics would leave the site un-noised
            # Validation Dice per threshold would be scalars outside the privacy accounting.
            self.choose_threshold = False
            if self.transfer_dtype != "float32":
                # Half precision rounds every weight by up to 2**-11 of its value both ways: far more
                # than the coordinator's clip check can allow without loosening the DP bound.
                raise ValueError("differential privacy needs transfer-dtype float32")

    @property
    def replies_needed(self) -> int:
        """Usable replies a round needs to aggregate: ``min_clients`` when every site trains,
        else ``min_train_nodes`` (0: ``min_clients``), never more than ``min_clients``."""
        if self.fraction_train >= 1:
            return self.min_clients
        return min(self.min_train_nodes or self.min_clients, self.min_clients)

    @property
    def privacy(self):
        """The run's :class:`~SegVizLogic.federated.privacy.DifferentialPrivacy`, or ``None``."""
        from .privacy import DifferentialPrivacy

        if self.dp_noise_multiplier <= 0 and self.dp_clipping_norm <= 0:
            return None
        return DifferentialPrivacy(self.dp_noise_multiplier, self.dp_clipping_norm)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationSettings:
        """Settings from a Flower run config (``[tool.flwr.app.config]`` plus overrides)."""
        cfg = {**APP_CONFIG_DEFAULTS, **dict(run_config)}
        return cls(
            rounds=int(cfg["num-server-rounds"]),
            local_epochs=int(cfg["local-epochs"]),
            lr=float(cfg["lr"]),
            strategy=str(cfg["strategy"]).lower(),
            weighting=str(cfg["weighting"]).lower(),
            head_aggregation=str(cfg["head-aggregation"]).lower(),
            min_clients=int(cfg["min-clients"]),
            round_timeout=float(cfg["round-timeout"]),
            wait_timeout=float(cfg["wait-timeout"]),
            out_dir=str(cfg["out-dir"]),
            share_final_batchnorm=bool(cfg["share-final-batchnorm"]),
            default_batchnorm=str(cfg["default-batchnorm"]),
            seed=int(cfg["seed"]),
            network=NetworkConfig.from_dict(_json_or_empty(cfg["network-config"])),
            training=_json_or_empty(cfg["training-config"]),
            preprocessing=Preprocessing.from_dict(_json_or_empty(cfg["preprocessing"]))
            if cfg["preprocessing"]
            else Preprocessing(),
            resume_from=str(cfg["resume-from"]),
            signing_key=str(cfg["signing-key"]),
            dp_noise_multiplier=float(cfg["dp-noise-multiplier"]),
            dp_clipping_norm=float(cfg["dp-clipping-norm"]),
            fraction_train=float(cfg["fraction-train"]),
            min_train_nodes=int(cfg["min-train-nodes"]),
            round_deadline=float(cfg["round-deadline"]),
            transfer_dtype=str(cfg["transfer-dtype"]),
            choose_threshold=str(cfg["choose-threshold"]).strip().lower() in ("true", "1", "yes"),
        )

    def to_run_config(self) -> dict[str, Any]:
        """The Flower run config (``flwr run --run-config``) for these settings."""
        return {
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "strategy": self.strategy,
            "weighting": self.weighting,
            "head-aggregation": self.head_aggregation,
            "min-clients": self.min_clients,
            "round-timeout": int(self.round_timeout),
            "wait-timeout": int(self.wait_timeout),
            "out-dir": self.out_dir,
            "share-final-batchnorm": self.share_final_batchnorm,
            "default-batchnorm": self.default_batchnorm,
            "seed": self.seed,
            "network-config": json.dumps(self.network.to_dict()),
            "training-config": json.dumps(self.training),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "resume-from": self.resume_from,
            "signing-key": self.signing_key,
            "dp-noise-multiplier": self.dp_noise_multiplier,
            "dp-clipping-norm": self.dp_clipping_norm,
            "fraction-train": self.fraction_train,
            "min-train-nodes": self.min_train_nodes,
            "round-deadline": self.round_deadline,
            "transfer-dtype": self.transfer_dtype,
            "choose-threshold": self.choose_threshold,
        }

    def client_config(self, server_round: int, lineage: str) -> dict[str, Any]:
        """What every site needs for one round: the ``config`` record of a train message."""
        return {
            "server-round": server_round,
            "num-server-rounds": self.rounds,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "strategy": self.strategy,
            "head-aggregation": self.head_aggregation,
            "share-final-batchnorm": self.share_final_batchnorm,
            "seed": self.seed,
            "lineage": lineage,
            "segviz-version": __version__,
            "network-config": json.dumps(self.network.to_dict()),
            "training-config": json.dumps(self.training),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            # Sites clip their update to this norm (privacy.dp_clipping_mod); absent: no DP.
            **({"dp-clipping-norm": self.dp_clipping_norm} if self.privacy is not None else {}),
            # Sites send their shared body back in this dtype (transfer.py).
            "transfer-dtype": self.transfer_dtype,
            # A threshold question follows the final round (a site that leaves after one run waits for it).
            "choose-threshold": self.choose_threshold,
        }


# --- local (on-site) state ------------------------------------------------------------------


def local_state_dir(site_dir: str | Path) -> Path:
    """Where a site keeps its federated state (``<site>/.segviz/federated``)."""
    return Path(site_dir) / LOCAL_STATE_DIR


def _network_fingerprint(config: NetworkConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def save_local_batchnorm(site_dir: str | Path, batchnorm: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> Path:
    """Persist a site's BatchNorm and round info under ``<site>/.segviz/federated`` (atomic)."""
    folder = local_state_dir(site_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".batchnorm-{os.getpid()}.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in batchnorm.items()})
    os.replace(tmp, folder / "batchnorm.npz")
    tmp_info = folder / f".state-{os.getpid()}.json"
    tmp_info.write_text(
        json.dumps({**info, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2),
        encoding="utf-8",
    )
    os.replace(tmp_info, folder / "state.json")
    return folder / "batchnorm.npz"


def load_local_batchnorm(
    site_dir: str | Path, lineage: str, network: NetworkConfig
) -> tuple[dict[str, np.ndarray], dict] | None:
    """A site's saved BatchNorm if it belongs to this model lineage and network, else ``None``.

    BatchNorm statistics describe the features of one model's body; reusing those of an
    unrelated run would be wrong, so only the same lineage (same run, or a run resumed from
    its bundle) resumes.
    """
    folder = local_state_dir(site_dir)
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if info.get("lineage") != lineage or info.get("network") != _network_fingerprint(network):
            return None
        with np.load(folder / "batchnorm.npz", allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, info
    except (OSError, ValueError, KeyError):
        return None


# --- model <-> partition --------------------------------------------------------------------


def load_partition_into_model(model: torch.nn.Module, groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Copy the given groups' tensors into ``model`` (other tensors stay as they are).

    Raises:
        ValueError: a tensor the model does not have, or of another shape.
    """
    state = model.state_dict()
    for group, arrays in groups.items():
        for key, value in arrays.items():
            if key not in state:
                raise ValueError(f"tensor {key} ({group}) is not part of this network")
            value = np.asarray(value)
            if state[key].dim() == 0 and value.size == 1:
                value = value.reshape(())  # Flower ships 0-d tensors (num_batches_tracked) as (1,)
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"tensor {key} has shape {np.shape(value)}, the network expects {tuple(state[key].shape)}"
                )
            state[key] = torch.as_tensor(np.array(value)).to(state[key].dtype)
    model.load_state_dict(state)


# --- one site's round -----------------------------------------------------------------------


@dataclass
class ClientRoundResult:
    """What a site sends back after a round (nothing else leaves the site), and, for the site's
    own logs and benchmarks only, where its training time went (``data_path``: never sent)."""

    site: str
    organs: tuple[str, ...]
    partition: Partition
    metrics: dict[str, float]
    final_batchnorm: dict[str, np.ndarray] | None = None
    data_path: dict[str, Any] | None = None


def train_client_round(
    site_dir: str | Path,
    global_groups: Mapping[str, Mapping[str, np.ndarray]],
    config: Mapping[str, Any],
    state: Any | None = None,
    reporter: ProgressReporter | None = None,
    device: str = "auto",
) -> ClientRoundResult:
    """Train one site for one federated round.

    Loads the global ``shared`` and head tensors (and ``batchnorm`` under FedAvg), restores
    the site's own BatchNorm under FedBN (from ``state``, Flower's ``context.state``, during a
    run; from ``<site>/.segviz/federated`` after the site left and re-joined; a site with no
    BatchNorm of this lineage, one that joins late, starts from the federation's averaged
    BatchNorm when the coordinator sent one, else from the initial one), trains
    ``local-epochs`` epochs, saves the BatchNorm back to both, and returns only what leaves
    the site: ``shared``, the heads it taught (those of the organs it annotates; under
    ``head-aggregation = "evidence"`` also those its exclusion term taught, with the voxel
    counts behind each as ``evidence-<organ>`` metrics), scalar metrics, and under FedAvg (or in
    the final round when ``share-final-batchnorm``) its BatchNorm.

    Args:
        site_dir: the site folder.
        global_groups: the global model's groups received this round, and possibly the
            coordinator's averaged BatchNorm (:data:`~SegVizLogic.federated.AVERAGED_BATCHNORM_RECORD`).
        config: the train message's ``config`` record (see :meth:`FederationSettings.client_config`).
        state: ``context.state`` (a ``RecordDict``) or ``None``.
        reporter: progress of the local epochs.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from ..training import TrainingConfig, load_site_data, resolve_device, seed_everything, train_site

    coordinator = str(config.get("segviz-version", __version__))
    if coordinator.split(".")[:2] != __version__.split(".")[:2]:
        raise ValueError(
            f"the coordinator runs SegViz {coordinator} and this site SegViz {__version__}: install the same version"
        )
    server_round = int(config["server-round"])
    rounds = int(config["num-server-rounds"])
    strategy = str(config["strategy"])
    lineage = str(config["lineage"])
    network = NetworkConfig.from_dict(_json_or_empty(config["network-config"]))
    preprocessing = (
        Preprocessing.from_dict(_json_or_empty(config["preprocessing"])) if config["preprocessing"] else Preprocessing()
    )
    training = TrainingConfig.from_dict(_json_or_empty(config["training-config"]))
    # A new patch order every round, reproducible from the run's seed.
    training = replace(training, seed=int(config.get("seed", 0)) * 1000 + training.seed + server_round)
    seed_everything(training.seed)

    data = load_site_data(site_dir, preprocessing, training)
    model = build_network(network)
    global_groups = dict(global_groups)
    averaged_batchnorm = global_groups.pop(AVERAGED_BATCHNORM_RECORD, None)
    unknown = sorted(set(global_groups) - set(partition_state(model)))
    if unknown:
        raise ValueError(f"the server sent groups this network does not have: {unknown}")
    load_partition_into_model(model, global_groups)

    restored = "initial"
    if strategy == "fedbn":
        batchnorm = None
        if state is not None and _STATE_BATCHNORM in state.array_records:
            info = state.config_records.get(_STATE_INFO, {})
            if info.get("lineage") == lineage:
                batchnorm = {k: v.numpy() for k, v in state.array_records[_STATE_BATCHNORM].items()}
                restored = "context"
        if batchnorm is None:
            saved = load_local_batchnorm(site_dir, lineage, network)
            if saved is not None:
                batchnorm, restored = saved[0], "disk"
        if batchnorm is None and averaged_batchnorm is not None:
            # Joining late: the federation's averaged BatchNorm (trained gamma/beta, statistics of
            # the sites' features) is a far better start than the initial gamma 1, beta 0.
            batchnorm, restored = averaged_batchnorm, "averaged"
        if batchnorm is not None:
            load_partition_into_model(model, {PARTITION_BATCHNORM: batchnorm})

    start = time.perf_counter()
    # One cosine learning-rate schedule over the whole run: round r of R covers ((r-1)/R, r/R).
    server_round, rounds = int(config.get("server-round", 1)), max(int(config.get("num-server-rounds", 1)), 1)
    result = train_site(
        model,
        data,
        int(config["local-epochs"]),
        float(config["lr"]),
        resolve_device(device),
        reporter=reporter,
        config=training,
        lr_span=((server_round - 1) / rounds, min(server_round, rounds) / rounds),
    )
    seconds = time.perf_counter() - start

    groups = partition_state(model)
    batchnorm = groups.get(PARTITION_BATCHNORM, {})
    info = {
        "lineage": lineage,
        "round": server_round,
        "rounds": rounds,
        "strategy": strategy,
        "network": _network_fingerprint(network),
    }
    if state is not None:
        state[_STATE_BATCHNORM] = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in batchnorm.items()}
        )
        state[_STATE_INFO] = ConfigRecord({k: v for k, v in info.items()})
    save_local_batchnorm(site_dir, batchnorm, info)

    organs = tuple(o for o in data.organs if o in network.organs)
    taught = organs
    if str(config.get("head-aggregation", "annotating")) == "evidence":
        taught = tuple(o for o in network.organs if o in organs or result.head_evidence.get(o, 0.0) > 0)
    reply: Partition = {PARTITION_SHARED: groups[PARTITION_SHARED]}
    reply.update({HEAD_PREFIX + o: groups[HEAD_PREFIX + o] for o in taught})
    if strategy == "fedavg":
        reply[PARTITION_BATCHNORM] = batchnorm
    final_batchnorm = (
        batchnorm
        if (strategy == "fedbn" and server_round >= rounds and bool(config["share-final-batchnorm"]))
        else None
    )

    metrics = {
        "num-examples": int(result.num_examples),
        # A count only (the held-out cases stay unnamed): model-info reports it per site.
        "num-val-examples": len(data.val_items),
        "loss": float(result.loss),
        "steps": int(result.steps),
        "train-seconds": float(seconds),
        "batchnorm-restored": {"initial": 0, "context": 1, "disk": 2, "averaged": 3}[restored],
    }
    metrics.update({f"evidence-{organ}": float(result.head_evidence.get(organ, 0.0)) for organ in taught})
    metrics.update({f"dice-{organ}": float(value) for organ, value in result.val_dice.items()})
    return ClientRoundResult(
        site=data.name,
        organs=organs,
        partition=reply,
        metrics=metrics,
        final_batchnorm=final_batchnorm,
        data_path=None if result.data_path is None else result.data_path.to_dict(),
    )


def new_lineage() -> str:
    """A fresh model-lineage id (a run from scratch)."""
    return uuid.uuid4().hex


def score_thresholds_on_site(
    site_dir: str | Path,
    bundle_bytes: bytes,
    training: Mapping[str, Any],
    candidates: list[float],
    device: str = "auto",
    reporter: ProgressReporter | None = None,
    batchnorms: list[str] | None = None,
):
    """The site's answer to the threshold question: its held-out validation cases (the split its
    training used, ``training``'s ``val_fraction``) segmented once per BatchNorm candidate with the
    final model ``bundle_bytes`` as a hospital that never trained it would (its own BatchNorm left
    out), Dice per candidate threshold on the organs it annotated.

    Returns:
        ``(site name, {batchnorm: {threshold: {organ: (sum of Dice, cases)}}})``
        (:data:`~SegVizLogic.threshold_selection.SiteTally`).

    Raises:
        BundleError: the bytes are not a valid bundle (checked like any file: sizes, checksums).
        ValueError: a BatchNorm candidate the bundle does not offer.
    """
    import tempfile

    from ..bundle import load_bundle
    from ..inference import resolve_device
    from ..site import validate_site
    from ..threshold_selection import site_threshold_tally
    from ..training import TrainingConfig

    site = validate_site(site_dir, check_images=False)
    folder = local_state_dir(site_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".final-", suffix=".segviz", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(bundle_bytes)
        bundle = load_bundle(name)
    finally:
        Path(name).unlink(missing_ok=True)
    val_fraction = TrainingConfig.from_dict(training).val_fraction
    tally = site_threshold_tally(bundle, site, val_fraction, resolve_device(device), candidates, reporter, batchnorms)
    return site.name, tally
