"""The SegViz network: a shared MONAI UNet body with one output head per organ, and the
parameter partition (``shared`` / ``batchnorm`` / ``head:<organ>``) that FedBN stands on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

# isort: off
from . import lean_monai  # noqa: F401  (before MONAI: keeps its heavy optional packages out)

# isort: on
from monai.networks.nets import UNet
from torch import nn

from .organs import ORGAN_NAMES, organ_by_name

__all__ = [
    "HEAD_PREFIX",
    "PARTITION_BATCHNORM",
    "PARTITION_SHARED",
    "MultiOrganUNet",
    "NetworkConfig",
    "build_network",
    "parameter_group",
    "partition_state",
]

PARTITION_SHARED = "shared"
PARTITION_BATCHNORM = "batchnorm"
HEAD_PREFIX = "head:"


@dataclass(frozen=True)
class NetworkConfig:
    """Network hyper-parameters; stored in every model bundle.

    The defaults are the SegViz paper's configuration: 3D UNet, channels 16-256, strides 2,
    two residual units per block, BatchNorm.

    Args:
        organs: organs that get an output head, in schema order.
        channels: feature channels per UNet level.
        strides: down-sampling strides between levels (input sizes must be multiples of
            their product).
        num_res_units: residual units per block.
        body_features: channels of the body's output that every head reads.
        dropout: dropout probability in the body.
        output: ``"sigmoid"`` (each organ its own probability: the partial-label model) or
            ``"softmax"`` (organ logits against a fixed zero background logit: the naive
            pooled baseline of the paper).
    """

    organs: tuple[str, ...] = ORGAN_NAMES
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    body_features: int = 16
    dropout: float = 0.0
    output: str = "sigmoid"

    def __post_init__(self) -> None:
        if not self.organs:
            raise ValueError("organs must name at least one organ")
        for name in self.organs:
            organ_by_name(name)
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides {self.strides} must have one entry fewer than channels {self.channels}")
        if self.output not in ("sigmoid", "softmax"):
            raise ValueError(
                f"output must be 'sigmoid' (one binary problem per organ) or 'softmax', got {self.output!r}"
            )
        if self.num_res_units < 0 or self.body_features < 1:
            raise ValueError(f"invalid num_res_units={self.num_res_units} or body_features={self.body_features}")

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return int(np.prod(self.strides))

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class MultiOrganUNet(nn.Module):
    """MONAI UNet body shared by all organs, and one 1-channel logit head per organ.

    Input ``(B, 1, X, Y, Z)`` (CT windowed to [0, 1]); output ``(B, len(organs), X, Y, Z)``
    logits, channel ``i`` for ``config.organs[i]``. Each organ's probability is the sigmoid
    of its logit: organs are independent binary problems, which lets a site teach only the
    organs it annotated.

    Example::

        net = MultiOrganUNet(NetworkConfig())
        logits = net(torch.zeros(1, 1, 64, 64, 32))  # -> (1, 4, 64, 64, 32)
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.body = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=config.body_features,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            norm="BATCH",
            dropout=config.dropout,
        )
        # The body's last layer is a plain convolution; the heads add the non-linearity.
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.PReLU(config.body_features), nn.Conv3d(config.body_features, 1, 1))
                for name in config.organs
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        return torch.cat([self.heads[name](features) for name in self.config.organs], dim=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-organ probabilities ``(B, C, ...)`` from this network's logits."""
        if self.config.output == "softmax":
            background = torch.zeros_like(logits[:, :1])
            return torch.softmax(torch.cat([background, logits], dim=1), dim=1)[:, 1:]
        return torch.sigmoid(logits)


def build_network(config: NetworkConfig | None = None) -> MultiOrganUNet:
    """Build the SegViz network (paper configuration by default)."""
    return MultiOrganUNet(config or NetworkConfig())


def _batchnorm_prefixes(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}


def parameter_group(name: str, batchnorm_modules: Iterable[str]) -> str:
    """Group of one state-dict key: ``"batchnorm"``, ``"head:<organ>"`` or ``"shared"``.

    Args:
        name: a key of ``model.state_dict()``.
        batchnorm_modules: qualified names of the model's BatchNorm modules.
    """
    module = name.rsplit(".", 1)[0]
    if module in set(batchnorm_modules):
        return PARTITION_BATCHNORM
    if name.startswith("heads."):
        return HEAD_PREFIX + name.split(".")[1]
    return PARTITION_SHARED


def partition_state(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Split a state dict into groups: ``shared``, ``batchnorm`` and ``head:<organ>``.

    This is the single definition of the FedBN partition. Every tensor lands in exactly one
    group; BatchNorm weights, biases, running mean/var and ``num_batches_tracked`` all land in
    ``batchnorm``.

    Args:
        model: the network (its module types decide what is BatchNorm).
        state: the state dict to split (``model.state_dict()`` by default).

    Returns:
        ``{group: {key: numpy array}}`` with groups in a stable order.
    """
    state = model.state_dict() if state is None else state
    bn = _batchnorm_prefixes(model)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        group = parameter_group(key, bn)
        groups.setdefault(group, {})[key] = tensor.detach().cpu().numpy().copy()
    return groups
