"""The experiment file (TOML): data, network, preprocessing, training, federation, arms, selection, seeds.

Example (``experiments/ci.toml``)::

    seeds = [0, 1]
    device = "cpu"

    [data]
    phantom = {size = "small", seed = 0, cases_per_site = 3, external_cases = 8}
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

    [selection]   # test-time options, chosen per arm on the sites' validation cases
    batchnorm = ["model", "averaged", "adapt"]
    overlap = [0.5]
    threshold = [0.5]
    checkpoints = ["final"]

    [learning_curve]   # only in a learning-curve file: one comparison per training-set size
    cases_per_site = [1, 2, 4, 8]
    unequal = [[8, 4, 2, 1]]
    validation_cases = 1

Every arm gets the same budget: federated arms train ``rounds × local_epochs`` local epochs at
each site; local and central arms train that many epochs. :func:`SegVizLogic.training_setup.setup_sections`
reads the ``[network]``, ``[preprocessing]``, ``[training]`` and ``[federation]`` sections, here and
for every command that shares that schema (``segviz train --config``...).
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
    "LEARNING_CURVE_ARMS",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LearningCurveConfig",
    "SelectionConfig",
    "config_from_dict",
    "load_config",
]

ARMS: tuple[str, ...] = ("local", "central-naive", "central-partial", "fedavg", "fedbn")
"""Every arm of the comparison, in the order tables and plots show them."""
FEDERATED_ARMS: tuple[str, ...] = ("fedavg", "fedbn")
LEARNING_CURVE_ARMS: tuple[str, ...] = ("local", "central-partial", "fedavg", "fedbn")
"""The arms of a learning curve unless ``[arms] run`` says otherwise (naive pooling is the
comparison's point, not the curve's)."""
BATCHNORM_DEFAULT_CHOICES: tuple[str, ...] = ("model", "per-organ", "averaged", "adapt")
"""BatchNorm candidates of every arm unless ``[selection] batchnorm`` says otherwise; each arm is
offered those its bundles carry (``"all"`` adds every ``organ:<organ>`` and ``site:<name>`` variant)."""

_TOP_KEYS = {
    "name",
    "description",
    "seeds",
    "device",
    "engine",
    "hd95",
    "data",
    "network",
    "preprocessing",
    "training",
    "federation",
    "arms",
    "selection",
    "learning_curve",
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
class SelectionConfig:
    """Test-time options every arm is offered, chosen per arm on the sites' validation cases.

    The candidates of an arm are every combination of a checkpoint, a BatchNorm choice its bundle
    offers, an overlap and a threshold (see :mod:`SegVizLogic.experiments.selection`).

    Args:
        batchnorm: BatchNorm candidates (``model``, ``per-organ``, ``averaged``, ``adapt``, a variant
            name, or ``"all"``); an arm is offered those its bundles carry (local and central models:
            ``model`` and ``adapt``).
        overlap: sliding-window overlaps (share of a window its neighbour covers).
        threshold: probability above which a voxel is an organ.
        checkpoints: federated arms' candidate rounds: ``"final"`` or round numbers (local and
            central arms keep their best validation epoch, chosen during training).
    """

    batchnorm: tuple[str, ...] = BATCHNORM_DEFAULT_CHOICES
    overlap: tuple[float, ...] = (0.5,)
    threshold: tuple[float, ...] = (0.5,)
    checkpoints: tuple[str | int, ...] = ("final",)

    def __post_init__(self) -> None:
        for name in ("batchnorm", "overlap", "threshold", "checkpoints"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"[selection] {name} must be a non-empty list of distinct values, got {list(values)}")
        if any(not 0.0 <= o < 1.0 for o in self.overlap):
            raise ValueError(f"[selection] overlap values must be in [0, 1), got {list(self.overlap)}")
        if any(not 0.0 < t < 1.0 for t in self.threshold):
            raise ValueError(f"[selection] threshold values must be in (0, 1), got {list(self.threshold)}")
        for c in self.checkpoints:
            if c != "final" and not (isinstance(c, int) and not isinstance(c, bool) and c >= 1):
                raise ValueError(f'[selection] checkpoints must be "final" or round numbers >= 1, got {c!r}')

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "batchnorm": list(self.batchnorm),
            "overlap": list(self.overlap),
            "threshold": list(self.threshold),
            "checkpoints": list(self.checkpoints),
        }


@dataclass(frozen=True)
class LearningCurveConfig:
    """A learning curve: the comparison repeated with 1, 2, 4, 8... training cases per site.

    Every point uses the same validation cases (the last ``validation_cases`` of each site, by name)
    and the same external set, and every arm of a point gets the same budget.

    Args:
        cases_per_site: training cases per site of the equal-site points.
        unequal: extra points with a different count per site, in the order of the sites
            (``[8, 4, 2, 1]``: the first site 8, the last 1).
        validation_cases: validation cases per site (held out of training at every point).
        budget: ``"steps"``: local epochs are scaled by the largest count over the point's largest
            count, so every point takes about as many optimisation steps as the largest and the
            curve measures data, not compute; ``"epochs"``: every point trains ``rounds ×
            local_epochs`` epochs (a point with fewer cases takes fewer steps).
    """

    cases_per_site: tuple[int, ...] = (1, 2, 4, 8)
    unequal: tuple[tuple[int, ...], ...] = ((8, 4, 2, 1),)
    validation_cases: int = 1
    budget: str = "steps"

    def __post_init__(self) -> None:
        counts = [*self.cases_per_site, *(c for point in self.unequal for c in point)]
        if not self.cases_per_site or any(c < 1 for c in counts):
            raise ValueError(
                f"[learning_curve] cases_per_site must be a non-empty list of counts >= 1, got {list(self.cases_per_site)}"
            )
        if len(set(self.cases_per_site)) != len(self.cases_per_site):
            raise ValueError(f"[learning_curve] cases_per_site has repeated counts: {list(self.cases_per_site)}")
        if self.validation_cases < 1:
            raise ValueError(f"[learning_curve] validation_cases must be >= 1, got {self.validation_cases}")
        if self.budget not in ("epochs", "steps"):
            raise ValueError(f"[learning_curve] budget must be 'epochs' or 'steps', got {self.budget!r}")

    @property
    def max_cases(self) -> int:
        """The most training cases any site has at any point."""
        return max([*self.cases_per_site, *(c for point in self.unequal for c in point)])

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "cases_per_site": list(self.cases_per_site),
            "unequal": [list(p) for p in self.unequal],
            "validation_cases": self.validation_cases,
            "budget": self.budget,
        }


@dataclass(frozen=True)
class ExperimentConfig:
    """One comparison (or a learning curve of comparisons): same sites, same external set, same
    network and budget for every arm.

    Args:
        data: the sites and the external set.
        network: the network of every arm (``central-naive`` uses it with ``output="softmax"``).
        preprocessing: the preprocessing of every arm.
        training: patch sampling and optimisation (``label_mode`` is set per arm).
        federation: budget and federated settings.
        arms: arms to run (subset of :data:`ARMS`).
        selection: test-time options, chosen per arm on validation.
        learning_curve: makes the experiment a learning curve; ``None`` for one comparison.
        seeds: training seeds; each external case is averaged over them before any test.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        engine: how the federated arms run: ``"auto"`` (Flower's simulation engine when Ray
            imports, else its deployment engine on loopback), ``"simulation"`` or ``"deployment"``
            (:func:`~SegVizLogic.federated.simulation.choose_engine`).
        hd95: also compute HD95 (mm) per external case and organ.
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
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    learning_curve: LearningCurveConfig | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    engine: str = "auto"
    hd95: bool = True
    name: str = "SegViz comparison"
    description: str = ""
    source: str | None = None

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"[arms] run must name some of {', '.join(ARMS)} once each; got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.engine not in ("auto", "simulation", "deployment"):
            raise ValueError(f"engine must be auto, simulation or deployment, got {self.engine!r}")
        if any(p % self.network.divisor for p in self.training.patch_size):
            raise ValueError(
                f"[training] patch_size {list(self.training.patch_size)} must be a multiple of "
                f"{self.network.divisor} (the product of [network] strides)"
            )
        late = [c for c in self.selection.checkpoints if c != "final" and c > self.federation.rounds]
        if late:
            raise ValueError(
                f"[selection] checkpoints {late} are beyond [federation] rounds = {self.federation.rounds}"
            )
        curve = self.learning_curve
        if curve is not None and self.data.phantom is not None:
            needed = curve.max_cases + curve.validation_cases
            have = self.data.phantom.get("cases_per_site")
            if have is not None and have < needed:
                raise ValueError(
                    f"[data] phantom cases_per_site = {have} is too few for the learning curve: "
                    f"{curve.max_cases} training + {curve.validation_cases} validation cases per site are needed"
                )

    @property
    def is_learning_curve(self) -> bool:
        """Whether this file describes a learning curve (a ``[learning_curve]`` section)."""
        return self.learning_curve is not None

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
            "federation": {**self.federation.to_dict(), "total_epochs": self.federation.total_epochs},
            "arms": list(self.arms),
            "selection": self.selection.to_dict(),
            "learning_curve": None if self.learning_curve is None else self.learning_curve.to_dict(),
            "seeds": list(self.seeds),
            "device": self.device,
            "engine": self.engine,
            "hd95": self.hd95,
        }


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _selection(data: Mapping) -> SelectionConfig:
    raw = _section(data, "selection")
    unknown = set(raw) - set(SelectionConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown [selection] keys {sorted(unknown)}: expected batchnorm, overlap, threshold, checkpoints"
        )
    defaults = SelectionConfig()
    return SelectionConfig(
        batchnorm=tuple(str(b) for b in _tuple(raw.get("batchnorm", defaults.batchnorm))),
        overlap=tuple(float(o) for o in _tuple(raw.get("overlap", defaults.overlap))),
        threshold=tuple(float(t) for t in _tuple(raw.get("threshold", defaults.threshold))),
        checkpoints=_tuple(raw.get("checkpoints", defaults.checkpoints)),
    )


def _learning_curve(data: Mapping) -> LearningCurveConfig | None:
    if "learning_curve" not in data:
        return None
    raw = _section(data, "learning_curve")
    unknown = set(raw) - set(LearningCurveConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown [learning_curve] keys {sorted(unknown)}: expected cases_per_site, unequal, validation_cases, budget"
        )
    defaults = LearningCurveConfig()
    return LearningCurveConfig(
        cases_per_site=tuple(int(c) for c in _tuple(raw.get("cases_per_site", defaults.cases_per_site))),
        unequal=tuple(tuple(int(c) for c in point) for point in raw.get("unequal", defaults.unequal)),
        validation_cases=int(raw.get("validation_cases", defaults.validation_cases)),
        budget=str(raw.get("budget", defaults.budget)),
    )


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
    if "batchnorm" in arms_raw:
        raise ValueError(
            "[arms] batchnorm has moved to [selection] batchnorm: every arm is offered the same test-time options"
        )
    unknown = set(arms_raw) - {"run"}
    if unknown:
        raise ValueError(f"unknown [arms] keys {sorted(unknown)}: expected run")
    curve = _learning_curve(data)
    default_arms = ARMS if curve is None else LEARNING_CURVE_ARMS
    seeds = data.get("seeds", [0])
    seeds = (seeds,) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    return ExperimentConfig(
        data=data_config,
        network=network,
        preprocessing=preprocessing,
        training=training,
        federation=federation,
        arms=tuple(arms_raw.get("run", default_arms)),
        selection=_selection(data),
        learning_curve=curve,
        seeds=seeds,
        device=str(data.get("device", "auto")),
        engine=str(data.get("engine", "auto")),
        hd95=bool(data.get("hd95", True)),
        name=str(data.get("name", "SegViz comparison" if curve is None else "SegViz learning curve")),
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
