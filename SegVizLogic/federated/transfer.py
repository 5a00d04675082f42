"""What travels on the wire: the shared body in float32, or in float16 to halve the bytes.

With ``transfer-dtype = "float16"`` the coordinator sends the shared body (``shared``, 19.3 MB
of the paper network's 19.4 MB) in half precision and each site sends its trained shared body
back the same way: 9.7 MB each way instead of 19.3 MB. Heads, BatchNorm and every integer
tensor stay as they are. Nothing is averaged in half precision: a site loads the received body
into its float32 network (``load_partition_into_model`` casts) and trains in float32, and the
coordinator sums replies in float64 into float32 master weights
(:class:`~SegVizLogic.federated.aggregation.RunningWeightedSum`). What float16 costs is one
rounding of every shared weight on each leg (relative error at most 2**-11); its Dice cost on
the phantom is what ``bench/bench_transfer_dtype.py`` measures (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["TRANSFER_DTYPES", "TRANSFER_GROUPS", "for_transfer"]

TRANSFER_DTYPES = ("float32", "float16")
TRANSFER_GROUPS = ("shared",)
"""The groups sent in ``transfer-dtype`` (the network's ``PARTITION_SHARED``; named here without
importing torch, which the ClientApp process does not load)."""


def for_transfer(group: str, arrays: Mapping[str, np.ndarray], transfer_dtype: str) -> dict[str, np.ndarray]:
    """``arrays`` of ``group`` as they go on the wire: floating tensors of a
    :data:`TRANSFER_GROUPS` group in ``transfer_dtype``, everything else unchanged.

    Raises:
        ValueError: an unknown ``transfer_dtype``.

    Example::

        for_transfer("shared", {"w": np.ones(3, np.float32)}, "float16")["w"].dtype  # -> float16
    """
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer-dtype must be one of {', '.join(TRANSFER_DTYPES)}, got {transfer_dtype!r}")
    if group not in TRANSFER_GROUPS or transfer_dtype == "float32":
        return dict(arrays)
    target = np.dtype(transfer_dtype)
    return {
        key: np.asarray(value).astype(target) if np.asarray(value).dtype.kind == "f" else value
        for key, value in arrays.items()
    }
