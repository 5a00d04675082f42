"""One training setup for every way of training: named presets, TOML files and flags.

A training setup is four sections, the same for ``segviz train``, ``segviz federation
simulate|run`` and ``segviz experiment`` (``experiments/*.toml``)::

    [network]        NetworkConfig: channels, strides, num_res_units, body_features, dropout
    [preprocessing]  Preprocessing: spacing, hu_window, orientation
    [training]       TrainingConfig: patch_size, batch_size, samples_per_case, val_fraction, ...
    [federation]     the budget: rounds, local_epochs, lr, weighting (local and central training
                     train rounds x local_epochs epochs, as every arm of the experiment does)

It comes from a preset (``--preset demo|cpu|paper``) or a file (``--config FILE.toml``; an
experiment file works too, its other keys are ignored), and single flags override single fields.
For a real federation it travels to the ServerApp as ``[tool.flwr.app.config]`` keys
(:meth:`SegVizLogic.federated.task.FederationSettings.to_run_config`).

The presets are not copies: ``demo`` is :data:`DEMO_PRESET` below (``segviz demo`` reads it),
``cpu`` and ``paper`` are read from ``experiments/cpu.toml`` and ``experiments/paper.toml``.

Nothing here imports torch at import time: ``segviz --help`` and argument parsing stay fast.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from .errors import SegVizInputError

if TYPE_CHECKING:
    from .network import NetworkConfig
    from .preprocessing import Preprocessing
    from .training import TrainingConfig

__all__ = [
    "DEFAULT_PRESET",
    "DEMO_PRESET",
    "EXPERIMENT_ONLY_KEYS",
    "PRESETS",
    "SETUP_OPTIONS",
    "SETUP_SECTIONS",
    "FederationConfig",
    "SetupOption",
    "TrainingSetup",
    "add_setup_arguments",
    "config_section",
    "load_preset",
    "load_setup_file",
    "preset_sections",
    "setup_from_args",
    "setup_from_sections",
    "setup_sections",
]

SETUP_SECTIONS: tuple[str, ...] = ("network", "preprocessing", "training", "federation")
"""The sections of a training setup, in the order files and ``model-info`` show them."""
EXPERIMENT_ONLY_KEYS = frozenset(
    {"name", "description", "seeds", "device", "hd95", "data", "arms", "selection", "learning_curve"}
)
"""Top-level keys of an experiment file that ``--config`` accepts and ignores (they are not training settings)."""

PRESETS: dict[str, str] = {
    "demo": "the demo's setup (segviz demo): UNet 16-128, 4 mm, 48x48x32 patches, 48 rounds x 2 local epochs",
    "cpu": "experiments/cpu.toml's setup: the comparison at the demo's scale on 2 CPU cores",
    "paper": "experiments/paper.toml's setup: the paper's UNet 16-256 at 1.5x1.5x2 mm, for a GPU",
}
DEFAULT_PRESET = "paper"
"""The setup when neither ``--preset`` nor ``--config`` is given: the paper's network and preprocessing."""

# The demo on 2 CPU cores (its measured time: README). The paper's UNet (16-256 channels, four
# down-samplings, two residual units) at 1.5x1.5x2 mm needs a GPU; the demo keeps its design
# (MONAI UNet with BatchNorm, one head per organ) one level shallower with one residual unit, and
# resamples to 4 mm so that a 48x48x32 patch sees 19x19x13 cm of abdomen. Each step is one batch
# of 4 patches drawn from the site's six training patients (4 per patient and epoch; the demo's
# phantom holds 8 patients a site, 2 held out), so each site makes 576 steps in the federation
# (48 rounds x 2 local epochs x 6 steps): averaged every 12 steps, chosen on the sites' validation
# cases over 24 x 3 and 72 x 1 (docs/METHOD.md section 5). Six patients a site instead of three,
# then 48 rounds instead of 36, were chosen on the cross-scanner validation (docs/METHOD.md section 5).
# Each head is averaged over the sites that annotate its organ (evidence aggregation validated
# level with it: docs/METHOD.md, so the simpler rule stays).
DEMO_PRESET: dict[str, dict[str, Any]] = {
    "network": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1},
    "preprocessing": {"spacing": [4.0, 4.0, 4.0]},
    "training": {"patch_size": [48, 48, 32], "batch_size": 4, "samples_per_case": 4},
    "federation": {"rounds": 48, "local_epochs": 2, "lr": 0.002, "weighting": "uniform"},
}
"""The ``demo`` preset, in the sections of a setup file (fields not named keep their defaults)."""


@dataclass(frozen=True)
class FederationConfig:
    """The shared training budget and the federated settings.

    Args:
        rounds: federated rounds.
        local_epochs: local epochs per round (local and central arms train
            ``rounds * local_epochs`` epochs).
        lr: AdamW learning rate of every arm.
        weighting: ``"uniform"`` (the paper's) or ``"examples"``.
    """

    rounds: int = 3
    local_epochs: int = 2
    lr: float = 1e-3
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1, got {self.rounds} and {self.local_epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting must be 'uniform' or 'examples', got {self.weighting!r}")

    @property
    def total_epochs(self) -> int:
        """Epochs every arm trains: ``rounds * local_epochs``."""
        return self.rounds * self.local_epochs

    def to_dict(self) -> dict:
        """JSON-ready dict (the ``[federation]`` section)."""
        return {"rounds": self.rounds, "local_epochs": self.local_epochs, "lr": self.lr, "weighting": self.weighting}


def config_section(data: Mapping, key: str) -> dict:
    """Section ``key`` of a parsed TOML mapping (empty when absent).

    Raises:
        ValueError: the key holds something other than a table.
    """
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"[{key}] must be a table, got {type(value).__name__}")  # noqa: TRY004 - a config error, reported as such
    return dict(value)


def setup_sections(data: Mapping[str, Any]) -> tuple[NetworkConfig, Preprocessing, TrainingConfig, FederationConfig]:
    """Parse ``[network]``, ``[preprocessing]``, ``[training]`` and ``[federation]`` of a TOML mapping.

    The one parser of these sections: the experiment file uses it as well. Fields a section
    does not name keep the dataclass defaults.

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    from .network import NetworkConfig
    from .preprocessing import Preprocessing
    from .training import TrainingConfig

    network = NetworkConfig.from_dict(config_section(data, "network"))
    pre = config_section(data, "preprocessing")
    unknown = set(pre) - set(Preprocessing.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown [preprocessing] keys {sorted(unknown)}")
    defaults = Preprocessing()
    preprocessing = Preprocessing(
        spacing=tuple(pre.get("spacing", defaults.spacing)),
        hu_window=tuple(pre.get("hu_window", defaults.hu_window)),
        orientation=pre.get("orientation", defaults.orientation),
    )
    training = TrainingConfig.from_dict(config_section(data, "training"))
    fed = config_section(data, "federation")
    unknown = set(fed) - set(FederationConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown [federation] keys {sorted(unknown)}: expected rounds, local_epochs, lr, weighting")
    federation = FederationConfig(**fed)
    return network, preprocessing, training, federation


@dataclass(frozen=True)
class TrainingSetup:
    """Network, preprocessing, training and budget of one training, and where they came from.

    Args:
        network: the network.
        preprocessing: the preprocessing.
        training: patch sampling, validation split and optimisation.
        federation: rounds, local epochs, learning rate and weighting (the budget of local and
            central training: ``rounds * local_epochs`` epochs).
        source: ``"preset demo"``, ``"config my.toml"``, plus the flags that overrode it.

    Example::

        setup = load_preset("demo").override({"training": {"val_fraction": 0.0}})
        setup.training.val_fraction  # 0.0
    """

    network: NetworkConfig
    preprocessing: Preprocessing
    training: TrainingConfig
    federation: FederationConfig
    source: str = "defaults"

    def __post_init__(self) -> None:
        if any(p % self.network.divisor for p in self.training.patch_size):
            raise ValueError(
                f"[training] patch_size {list(self.training.patch_size)} must be a multiple of "
                f"{self.network.divisor} (the product of [network] strides)"
            )

    @property
    def total_epochs(self) -> int:
        """Epochs of local or central training with this budget (``rounds * local_epochs``)."""
        return self.federation.total_epochs

    def to_dict(self) -> dict[str, dict]:
        """The four sections as JSON-ready dicts (every field, defaults included)."""
        return {
            "network": self.network.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "training": self.training.to_dict(),
            "federation": self.federation.to_dict(),
        }

    def to_toml(self) -> str:
        """The setup as a ``--config`` file (every field written out)."""
        lines = [f"# training setup: {self.source}"]
        for section, values in self.to_dict().items():
            lines += ["", f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def override(self, changes: Mapping[str, Mapping[str, Any]], source: str | None = None) -> TrainingSetup:
        """A copy with single fields replaced: ``{"training": {"val_fraction": 0.0}, ...}``.

        New ``channels`` without new ``strides`` get strides of 2 between every level when the
        old strides no longer fit.

        Raises:
            ValueError: an unknown section or field, or an invalid value.
        """
        parts = {name: getattr(self, name) for name in SETUP_SECTIONS}
        for section, values in changes.items():
            if section not in parts:
                raise ValueError(f"unknown section [{section}]: expected one of {', '.join(SETUP_SECTIONS)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            known = {f.name for f in fields(parts[section])}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"unknown [{section}] keys {unknown}")
            if (
                section == "network"
                and "channels" in values
                and "strides" not in values
                and len(parts["network"].strides) != len(values["channels"]) - 1
            ):
                values["strides"] = (2,) * (len(values["channels"]) - 1)
            parts[section] = replace(parts[section], **values)
        return TrainingSetup(**parts, source=source or self.source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    return str(value)


def setup_from_sections(data: Mapping[str, Any], source: str = "defaults") -> TrainingSetup:
    """A :class:`TrainingSetup` from a mapping with (some of) the four sections.

    Raises:
        ValueError: an unknown key or an invalid value.
    """
    network, preprocessing, training, federation = setup_sections(data)
    return TrainingSetup(network, preprocessing, training, federation, source=source)


def _experiment_folders() -> list[Path]:
    # A checkout (or an editable install) has experiments/ beside the package; a wheel installs
    # the files under <prefix>/share/segviz/experiments (pyproject [tool.setuptools.data-files]).
    return [Path(__file__).resolve().parents[1] / "experiments", Path(sys.prefix) / "share" / "segviz" / "experiments"]


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise SegVizInputError(path, f"cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise SegVizInputError(path, f"invalid TOML ({error})") from None


def preset_sections(name: str) -> dict[str, dict[str, Any]]:
    """The sections of preset ``name`` as a setup file would hold them.

    Raises:
        SegVizInputError: an unknown preset, or its experiment file missing from this installation.
    """
    if name not in PRESETS:
        raise SegVizInputError(None, f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    if name == "demo":
        return copy.deepcopy(DEMO_PRESET)
    for folder in _experiment_folders():
        path = folder / f"{name}.toml"
        if path.is_file():
            data = _read_toml(path)
            return {section: dict(data[section]) for section in SETUP_SECTIONS if isinstance(data.get(section), dict)}
    raise SegVizInputError(
        None,
        f"preset {name!r} reads experiments/{name}.toml, which this installation lacks "
        f"(looked in {', '.join(str(f) for f in _experiment_folders())}); pass --config FILE.toml instead",
    )


@cache
def load_preset(name: str) -> TrainingSetup:
    """The training setup of preset ``name`` (``demo``, ``cpu`` or ``paper``).

    Raises:
        SegVizInputError: an unknown preset, a missing or invalid preset file.
    """
    sections = preset_sections(name)
    try:
        return setup_from_sections(sections, source=f"preset {name}")
    except (ValueError, TypeError) as error:
        raise SegVizInputError(None, f"preset {name!r}: {error}") from None


def load_setup_file(path: str | Path) -> TrainingSetup:
    """The training setup of a TOML file with ``[network]``, ``[preprocessing]``, ``[training]``
    and ``[federation]`` sections; an experiment file's other keys (:data:`EXPERIMENT_ONLY_KEYS`)
    are ignored.

    Raises:
        SegVizInputError: unreadable TOML, an unknown key or an invalid value (the message names the file).
    """
    path = Path(path)
    data = _read_toml(path)
    unknown = sorted(set(data) - set(SETUP_SECTIONS) - EXPERIMENT_ONLY_KEYS)
    if unknown:
        raise SegVizInputError(
            path, f"unknown top-level keys {unknown}: a setup file has the sections {', '.join(SETUP_SECTIONS)}"
        )
    try:
        return setup_from_sections(data, source=f"config {path}")
    except (ValueError, TypeError) as error:
        raise SegVizInputError(path, str(error)) from None


# --- command-line options -------------------------------------------------------------------


def _numbers(kind: type, count: int | None = None, name: str = "numbers") -> Callable[[str], tuple]:
    """argparse type for ``16,32,64`` (``count`` values; a single value is repeated when ``count`` is set)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.replace("x", ",").split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} like 1,2,3 — got {text!r}") from None
        if count is not None and len(values) == 1:
            values *= count
        if not values or (count is not None and len(values) != count):
            raise argparse.ArgumentTypeError(f"expected {count or 'some'} {name} separated by commas — got {text!r}")
        return values

    return parse


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.25 — got {text!r}") from None


@dataclass(frozen=True)
class SetupOption:
    """A command-line flag that overrides one field of the training setup.

    Args:
        flag: the option (``--val-fraction``); its argparse dest is the flag without dashes.
        section: the setup section (``training``).
        key: the field (``val_fraction``), or ``total_epochs`` for ``--epochs``.
        parse: argparse type.
        help: what the field means (the preset values are appended).
        scope: ``"all"``, ``"train"`` (local and central training) or ``"federation"``.
        choices: allowed values.
        metavar: how ``--help`` names the value.
    """

    flag: str
    section: str
    key: str
    parse: Callable[[str], Any]
    help: str
    scope: str = "all"
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag."""
        return self.flag.lstrip("-").replace("-", "_")


_METAVARS = {
    "channels": "C,C,...",
    "strides": "S,S,...",
    "spacing": "X,Y,Z",
    "patch_size": "X,Y,Z",
    "hu_window": "LOW,HIGH",
    "lr": "LR",
}
"""How ``--help`` names values of fields whose option does not say (default ``N`` for whole numbers, ``X``)."""

SETUP_OPTIONS: tuple[SetupOption, ...] = (
    SetupOption("--channels", "network", "channels", _numbers(int, name="channel counts"), "UNet channels per level"),
    SetupOption(
        "--strides",
        "network",
        "strides",
        _numbers(int, name="strides"),
        "down-sampling between levels (default 2 each)",
    ),
    SetupOption("--res-units", "network", "num_res_units", int, "residual units per UNet block"),
    SetupOption("--body-features", "network", "body_features", int, "channels of the body that every organ head reads"),
    SetupOption("--dropout", "network", "dropout", _fraction, "dropout in the UNet body"),
    SetupOption("--spacing", "preprocessing", "spacing", _numbers(float, 3, "spacings"), "resampling spacing in mm"),
    SetupOption(
        "--hu-window", "preprocessing", "hu_window", _numbers(float, 2, "HU values"), "HU range mapped to [0, 1]"
    ),
    SetupOption("--patch", "training", "patch_size", _numbers(int, 3, "sizes"), "training patch in voxels"),
    SetupOption("--batch-size", "training", "batch_size", int, "patches per optimiser step"),
    SetupOption("--samples-per-case", "training", "samples_per_case", int, "patches drawn from each case per epoch"),
    SetupOption("--pos-fraction", "training", "pos_fraction", _fraction, "share of patches centred on an organ"),
    SetupOption(
        "--val-fraction",
        "training",
        "val_fraction",
        _fraction,
        "share of each site's cases held out for validation (0: train on every case)",
    ),
    SetupOption("--weight-decay", "training", "weight_decay", _fraction, "AdamW weight decay"),
    SetupOption(
        "--exclusion-weight",
        "training",
        "exclusion_weight",
        _fraction,
        "weight of the partial-label loss's exclusion term",
    ),
    SetupOption(
        "--recalibration-batches",
        "training",
        "recalibration_batches",
        int,
        "batches that re-estimate BatchNorm statistics after training",
    ),
    SetupOption("--seed", "training", "seed", int, "seeds initialisation and patch sampling"),
    SetupOption(
        "--label-mode",
        "training",
        "label_mode",
        str,
        "partial: loss on annotated organs only; naive: the paper's pooled baseline (unannotated = background)",
        scope="train",
        choices=("partial", "naive"),
    ),
    SetupOption("--lr", "federation", "lr", _fraction, "AdamW learning rate"),
    SetupOption(
        "--epochs",
        "federation",
        "total_epochs",
        int,
        "epochs (default: the setup's rounds x local_epochs, the budget every experiment arm gets)",
        scope="train",
    ),
    SetupOption("--rounds", "federation", "rounds", int, "federated rounds", scope="federation"),
    SetupOption("--local-epochs", "federation", "local_epochs", int, "local epochs per round", scope="federation"),
    SetupOption(
        "--weighting",
        "federation",
        "weighting",
        str,
        "average sites equally (the paper) or by their training cases",
        scope="federation",
        choices=("uniform", "examples"),
    ),
)
"""Every flag of the training setup (``--config`` sets every field, these the usual ones)."""


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _PresetValues:
    """The value of one field in every preset, computed only when ``--help`` is printed
    (argparse expands ``%(presets)s`` from the action's attributes at that moment), so that
    building the parser never reads a file or imports torch."""

    def __init__(self, option: SetupOption) -> None:
        self.option = option

    def __str__(self) -> str:
        parts = []
        for name in PRESETS:
            try:
                value = getattr(getattr(load_preset(name), self.option.section), self.option.key)
            except SegVizInputError:
                value = "?"
            parts.append(f"{name} {_format_value(value)}")
        return "; ".join(parts)


def add_setup_arguments(parser: argparse.ArgumentParser, scope: str) -> argparse._ArgumentGroup:
    """Add ``--preset``, ``--config`` and the setup flags of ``scope`` (``"train"`` or ``"federation"``).

    Every flag defaults to ``None`` (= the preset's or the file's value); ``--help`` shows each
    preset's value.
    """
    if scope not in ("train", "federation"):
        raise ValueError(f"scope must be 'train' or 'federation', got {scope!r}")
    group = parser.add_argument_group(
        "training setup",
        "Start from a preset or a TOML file with [network], [preprocessing], [training] and [federation] "
        "sections (experiments/*.toml work too); the flags below override single fields. "
        "Brackets show each preset's value.",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="; ".join(f"{name}: {text}" for name, text in PRESETS.items()) + f" (default {DEFAULT_PRESET})",
    )
    source.add_argument(
        "--config", type=Path, default=None, metavar="FILE.toml", help="a training setup file (see --preset)"
    )
    for option in SETUP_OPTIONS:
        if option.scope not in ("all", scope):
            continue
        action = group.add_argument(
            option.flag,
            dest=option.dest,
            type=option.parse,
            choices=option.choices,
            metavar=None
            if option.choices
            else option.metavar or _METAVARS.get(option.key, "N" if option.parse is int else "X"),
            default=None,
            help=f"{option.help} [%(presets)s]",
        )
        action.presets = _PresetValues(option)
    return group


def setup_from_args(args: argparse.Namespace) -> TrainingSetup:
    """The training setup the parsed options describe: ``--config`` or ``--preset`` (default
    :data:`DEFAULT_PRESET`), then every setup flag that was given.

    Raises:
        SegVizInputError: an unreadable or invalid file, or a flag value the setup refuses.
    """
    config = getattr(args, "config", None)
    base = (
        load_setup_file(config) if config is not None else load_preset(getattr(args, "preset", None) or DEFAULT_PRESET)
    )
    changes: dict[str, dict[str, Any]] = {}
    given = []
    for option in SETUP_OPTIONS:
        value = getattr(args, option.dest, None)
        if value is None or option.key == "total_epochs":
            continue
        changes.setdefault(option.section, {})[option.key] = value
        given.append(f"{option.flag} {_format_value(value)}")
    try:
        return base.override(changes, source=base.source + (f" with {' '.join(given)}" if given else ""))
    except (ValueError, TypeError) as error:
        raise SegVizInputError(config, str(error)) from None
