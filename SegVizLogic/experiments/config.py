"""The experiment file (TOML): data, network, preprocessing, training, federation, arms, seeds.

Example (``experiments/ci.toml``)::

    seeds = [0]
    device = "cpu"

    [data]
    phantom = {size = "small", seed = 0, cases_per_site = 3, external_cases = 6}
    # or, for a consortium's own data:
    # sites = ["/data/site-a", "/data/site-b"]
    # external = "/data/external"

    [network]
    channels = [8, 16, 32]
    strides = [2, 2]

    [preprocessing]
    spacing = [4.0, 4.0, 4.0]

    [training]
    patch_size = [32, 32, 16]

    [federation]
    rounds = 2
    local_epochs = 2
    lr = 0.002
    weighting = "uniform"

    [arms]
    run = ["local", "central-naive", "central-partial", "fedavg", "fedbn"]
    batchnorm = ["model", "per-organ", "averaged", "adapt"]

Every arm gets the same budget: federated arms train ``rounds × local_epochs`` local epochs at
each site; local and central arms train that many epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..network import NetworkConfig
from ..preprocessing import Preprocessing
from ..training import TrainingConfig
from ..training_setup import FederationConfig, setup_sections
from ..training_setup import config_section as _section

__all__ = [
    "ARMS",
    "BATCHNORM_DEFAULT_CHOICES",
    "FEDERATED_ARMS",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "config_from_dict",
    "load_config",
]

ARMS: tuple[str, ...] = ("local", "central-naive", "central-partial", "fedavg", "fedbn")
"""Every arm of the comparison, in the order tables and plots show them."""
FEDERATED_ARMS: tuple[str, ...] = ("fedavg", "fedbn")
BATCHNORM_DEFAULT_CHOICES: tuple[str, ...] = ("model", "per-organ", "averaged", "adapt")
"""BatchNorm choices of the FedBN model measured at the external site unless ``[arms] batchnorm`` says otherwise
(``"all"`` adds every ``organ:<organ>`` and ``site:<name>`` variant)."""

_TOP_KEYS = {
    "name",
    "description",
    "seeds",
    "device",
    "hd95",
    "data",
    "network",
    "preprocessing",
    "training",
    "federation",
    "arms",
}
_PHANTOM_KEYS = {"size", "seed", "cases_per_site", "external_cases"}


@dataclass(frozen=True)
class DataConfig:
    """Where the sites and the external set come from: a phantom, or real site folders.

    Args:
        phantom: keyword arguments of :func:`~SegVizLogic.phantom.generate_phantom_sites`
            (``size``, ``seed``, ``cases_per_site``, ``external_cases``), or ``None``.
        sites: training site folders (when not a phantom).
        external: the fully-labelled external site folder (when not a phantom).
        phantom_dir: where the phantom is written and, when its ``phantom.json`` matches,
            reused by later runs (with the sites' preprocessing cache); default ``<out>/data``.
    """

    phantom: dict | None = None
    sites: tuple[str, ...] = ()
    external: str | None = None
    phantom_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.phantom is None) == (not self.sites):
            raise ValueError('[data] needs either phantom = {...} or sites = [...] (with external = "..."), not both')
        if self.phantom is not None:
            unknown = set(self.phantom) - _PHANTOM_KEYS
            if unknown:
                raise ValueError(f"unknown [data] phantom keys {sorted(unknown)}: expected {sorted(_PHANTOM_KEYS)}")
        elif not self.external:
            raise ValueError('[data] sites = [...] needs external = "<fully-labelled site folder>"')


@dataclass(frozen=True)
class ExperimentConfig:
    """One comparison: same sites, same external set, same network and budget for every arm.

    Args:
        data: the sites and the external set.
        network: the network of every arm (``central-naive`` uses it with ``output="softmax"``).
        preprocessing: the preprocessing of every arm.
        training: patch sampling and optimisation (``label_mode`` is set per arm).
        federation: budget and federated settings.
        arms: arms to run (subset of :data:`ARMS`).
        batchnorm: BatchNorm choices of the FedBN model to measure at the external site.
        seeds: one full comparison per seed; per-case results are pooled over seeds.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        hd95: also compute HD95 (mm) per case and organ.
        name: a title for the report.
        description: free text for the report.
        source: the TOML file it was read from (provenance).
    """

    data: DataConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    arms: tuple[str, ...] = ARMS
    batchnorm: tuple[str, ...] = BATCHNORM_DEFAULT_CHOICES
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    hd95: bool = True
    name: str = "SegViz comparison"
    description: str = ""
    source: str | None = None

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"[arms] run must name some of {', '.join(ARMS)}; got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if any(p % self.network.divisor for p in self.training.patch_size):
            raise ValueError(
                f"[training] patch_size {list(self.training.patch_size)} must be a multiple of "
                f"{self.network.divisor} (the product of [network] strides)"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (written to results.json)."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "data": {
                "phantom": self.data.phantom,
                "sites": list(self.data.sites),
                "external": self.data.external,
                "phantom_dir": self.data.phantom_dir,
            },
            "network": self.network.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "training": self.training.to_dict(),
            "federation": {
                "rounds": self.federation.rounds,
                "local_epochs": self.federation.local_epochs,
                "lr": self.federation.lr,
                "weighting": self.federation.weighting,
                "total_epochs": self.federation.total_epochs,
            },
            "arms": list(self.arms),
            "batchnorm": list(self.batchnorm),
            "seeds": list(self.seeds),
            "device": self.device,
            "hd95": self.hd95,
        }


def config_from_dict(
    data: Mapping[str, Any], base_dir: str | Path = ".", source: str | None = None
) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a parsed TOML mapping.

    Relative site paths are taken relative to ``base_dir`` (the TOML file's folder).

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}: expected {sorted(_TOP_KEYS)}")
    base = Path(base_dir)
    raw_data = _section(data, "data")
    unknown = set(raw_data) - {"phantom", "sites", "external", "phantom_dir"}
    if unknown:
        raise ValueError(f"unknown [data] keys {sorted(unknown)}: expected phantom, or sites and external")

    def resolve(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else (base / p).resolve())

    phantom = raw_data.get("phantom")
    if phantom is True:
        phantom = {}
    data_config = DataConfig(
        phantom=dict(phantom) if isinstance(phantom, Mapping) else None,
        sites=tuple(resolve(s) for s in raw_data.get("sites", ())),
        external=resolve(raw_data["external"]) if raw_data.get("external") else None,
        phantom_dir=str(Path(raw_data["phantom_dir"]).expanduser()) if raw_data.get("phantom_dir") else None,
    )
    if "label_mode" in _section(data, "training"):
        raise ValueError("[training] label_mode is set per arm (central-naive uses 'naive'); remove it")
    # [network], [preprocessing], [training] and [federation] are a training setup: one parser for
    # these sections serves `segviz train --config` and `segviz federation --config` too.
    network, preprocessing, training, federation = setup_sections(data)
    arms_raw = _section(data, "arms")
    unknown = set(arms_raw) - {"run", "batchnorm"}
    if unknown:
        raise ValueError(f"unknown [arms] keys {sorted(unknown)}: expected run, batchnorm")
    batchnorm = arms_raw.get("batchnorm", list(BATCHNORM_DEFAULT_CHOICES))
    batchnorm = (batchnorm,) if isinstance(batchnorm, str) else tuple(batchnorm)
    seeds = data.get("seeds", [0])
    seeds = (seeds,) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    return ExperimentConfig(
        data=data_config,
        network=network,
        preprocessing=preprocessing,
        training=training,
        federation=federation,
        arms=tuple(arms_raw.get("run", ARMS)),
        batchnorm=batchnorm,
        seeds=seeds,
        device=str(data.get("device", "auto")),
        hd95=bool(data.get("hd95", True)),
        name=str(data.get("name", "SegViz comparison")),
        description=str(data.get("description", "")),
        source=source,
    )


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment TOML file.

    Raises:
        ValueError: unreadable TOML, an unknown key or an invalid value (the message names the file).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: invalid TOML ({error})") from None
    try:
        return config_from_dict(data, base_dir=path.parent, source=str(path))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None
