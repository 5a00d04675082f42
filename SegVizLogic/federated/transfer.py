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

Each group also travels *packed* (:func:`arrays_to_record`): Flower 1.42 sends every ``Array`` of a
message as its own objects, one HTTP request each (``pull-object`` / ``push-object``), so the
demo network's hundred-odd tensors cost 110-160 requests per site and leg, 20-40 s of a round on a
loaded 2-core machine behind the Fleet gateway (docs/BENCHMARKS.md). Packed, a group is one flat
array per dtype plus a small layout array: a handful of objects, the same bytes. And every group of a
message travels in that one record (:func:`put_groups`, :func:`content_groups`): a train message of the
demo's network is then 8-10 objects instead of 28-35 and a reply 9 instead of 14, each object one request per hop
(coordinator, SuperLink, SuperNode, ClientApp) on every site's way in and out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, RecordDict

__all__ = [
    "GROUPS_RECORD",
    "PACKED_LAYOUT",
    "TRANSFER_DTYPES",
    "TRANSFER_GROUPS",
    "arrays_to_record",
    "content_groups",
    "for_transfer",
    "put_groups",
    "record_to_arrays",
]

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


PACKED_LAYOUT = "segviz-packed-layout"
"""Key of the layout array in a packed ``ArrayRecord`` (JSON, UTF-8 bytes as uint8): for each
tensor its name, dtype, shape and element offset in the flat array of its dtype."""
_PACKED_KINDS = "fiub"  # numbers and booleans only: never an object or a string dtype
_MAX_LAYOUT_BYTES = 4 << 20


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` as one ``ArrayRecord`` of few Flower objects: the tensors of each dtype
    concatenated into one flat array (key: the dtype, e.g. ``"<f4"``) plus :data:`PACKED_LAYOUT`.
    :func:`record_to_arrays` gives the same dict back (names, dtypes, shapes, values).

    Raises:
        ValueError: a tensor of a dtype that is not a number or a boolean.
    """
    from flwr.app import Array, ArrayRecord

    layout, parts, sizes = [], {}, {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in _PACKED_KINDS:
            raise ValueError(f"{name}: dtype {value.dtype} cannot be sent (numbers only)")
        key = value.dtype.str
        offset = sizes.get(key, 0)
        layout.append([name, key, list(value.shape), offset])
        parts.setdefault(key, []).append(value.ravel())
        sizes[key] = offset + value.size
    record = {key: Array(np.concatenate(chunks)) for key, chunks in parts.items()}
    record[PACKED_LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8).copy())
    return ArrayRecord(array_dict=record)


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of an ``ArrayRecord``: unpacked when it was written by :func:`arrays_to_record`,
    else one per key (records built by hand, e.g. in tests). A packed record is checked before it
    is read: every dtype a number, every slice inside its flat array, nothing left over.

    Raises:
        ValueError: a malformed packed record (what a hostile peer could send).
    """
    if PACKED_LAYOUT not in record:
        return {k: v.numpy() for k, v in record.items()}
    raw = record[PACKED_LAYOUT].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_LAYOUT_BYTES:
        raise ValueError("packed record: the layout is not a small byte array")
    try:
        layout = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"packed record: unreadable layout ({type(error).__name__})") from None
    flats = {key: value.numpy() for key, value in record.items() if key != PACKED_LAYOUT}
    used = dict.fromkeys(flats, 0)
    out: dict[str, np.ndarray] = {}
    for entry in layout if isinstance(layout, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and entry[1] in flats):
            raise ValueError(f"packed record: bad layout entry {str(entry)[:80]}")
        name, key, shape, offset = entry
        flat = flats[key]
        if flat.ndim != 1 or flat.dtype.str != key or flat.dtype.kind not in _PACKED_KINDS:
            raise ValueError(f"packed record: {key} is not a flat array of that dtype")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ValueError(f"packed record: {name}: bad shape {shape!r}")
        size = math.prod(shape)  # Python integers: a hostile shape cannot wrap around to a small size
        if not isinstance(offset, int) or offset != used[key] or offset + size > flat.size:
            raise ValueError(f"packed record: {name}: slice outside its array")
        if name in out:
            raise ValueError(f"packed record: {name} twice")
        out[name] = flat[offset : offset + size].reshape(shape)
        used[key] = offset + size
    if any(used[key] != flat.size for key, flat in flats.items()):
        raise ValueError("packed record: values the layout does not name")
    return out


GROUPS_RECORD = "segviz-groups"
"""Name of the one ``ArrayRecord`` that holds every group of a message (:func:`put_groups`)."""
_GROUP_SEPARATOR = "/"  # between a group and a tensor name in the packed keys (never in a group's name)


def put_groups(content: RecordDict, groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Put every group of ``groups`` (``{group: {tensor: array}}``) into ``content`` as one packed
    record, :data:`GROUPS_RECORD`: one flat array per dtype and one layout for the whole message
    (:func:`arrays_to_record` over ``"<group>/<tensor>"`` keys), replacing the array records
    ``content`` had. :func:`content_groups` gives ``groups`` back.

    Raises:
        ValueError: a group name that is empty or holds ``/``; a tensor that is not a number.
    """
    flat = {}
    for group, arrays in groups.items():
        if not group or _GROUP_SEPARATOR in group:
            raise ValueError(f"group name {group!r} cannot be sent (empty, or holds {_GROUP_SEPARATOR!r})")
        flat.update({f"{group}{_GROUP_SEPARATOR}{name}": value for name, value in arrays.items()})
    for name in list(content.array_records):
        del content.array_records[name]
    content.array_records[GROUPS_RECORD] = arrays_to_record(flat)


def content_groups(content: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {tensor: array}}`` of a message: :data:`GROUPS_RECORD` unpacked (checked as
    :func:`record_to_arrays` checks it), and any other array record as the group of its name
    (records built one per group by hand, e.g. in tests).

    Raises:
        ValueError: a malformed packed record, a key without its group, or a group sent twice.
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, record in content.array_records.items():
        arrays = record_to_arrays(record)
        if name != GROUPS_RECORD:
            if name in groups:
                raise ValueError(f"group {name} sent twice")
            groups[name] = arrays
            continue
        packed: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            group, separator, tensor = key.partition(_GROUP_SEPARATOR)
            if not (group and separator and tensor):
                raise ValueError(f"packed groups: {key[:80]!r} names no group and tensor")
            packed.setdefault(group, {})[tensor] = value
        if set(packed) & set(groups):
            raise ValueError(f"group {min(set(packed) & set(groups))} sent twice")
        groups.update(packed)
    return groups
