"""What goes on the wire: each group packed into a few Flower objects, read back exactly, and a
hostile packed record refused with a reason (no torch, no Flower processes: seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from SegVizLogic.federated.transfer import PACKED_LAYOUT, arrays_to_record, record_to_arrays


def _demo_like_group(seed: int = 0) -> dict[str, np.ndarray]:
    """A shared body's worth of tensors: many small ones of mixed dtypes and shapes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in range(40):
        arrays[f"body.{layer}.conv.weight"] = rng.standard_normal((8, 8, 3, 3, 3)).astype(np.float32)
        arrays[f"body.{layer}.conv.bias"] = rng.standard_normal(8).astype(np.float32)
        arrays[f"body.{layer}.prelu"] = np.array([0.25], dtype=np.float32)
    arrays["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    arrays["empty"] = np.zeros((0, 3), dtype=np.float16)
    arrays["half"] = rng.standard_normal((2, 5)).astype(np.float16)
    return arrays


def _objects(record: ArrayRecord) -> int:
    """Flower objects of ``record`` (each one HTTP request between a SuperNode and the SuperLink)."""
    return len(get_all_nested_objects(record))


def test_a_packed_group_reads_back_exactly_in_a_handful_of_objects():
    arrays = _demo_like_group()
    packed = arrays_to_record(arrays)
    back = record_to_arrays(packed)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    per_tensor = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    # Three dtypes and the layout: a few objects instead of at least one per tensor.
    assert sorted(packed.keys()) == sorted(["<f4", "<i8", "<f2", PACKED_LAYOUT])
    assert _objects(packed) <= 12 < len(arrays) <= _objects(per_tensor)
    # Records built one tensor per key (by hand, in tests) still read.
    assert set(record_to_arrays(per_tensor)) == set(arrays)


def _hostile(layout, flats: dict[str, np.ndarray]) -> ArrayRecord:
    record = {key: Array(value) for key, value in flats.items()}
    raw = layout if isinstance(layout, bytes) else json.dumps(layout).encode()
    record[PACKED_LAYOUT] = Array(np.frombuffer(raw, dtype=np.uint8).copy())
    return ArrayRecord(array_dict=record)


FLAT = {"<f4": np.arange(6, dtype=np.float32)}


@pytest.mark.parametrize(
    ("layout", "flats", "reason"),
    [
        ([["w", "<f4", [2, 4], 0]], FLAT, "slice outside"),
        ([["w", "<f4", [2, 2], 2]], FLAT, "slice outside"),  # a gap: offsets must follow on
        ([["w", "<f4", [2, 3], 0], ["w", "<f4", [0], 6]], FLAT, "twice"),
        ([["w", "<f4", [2, 2], 0]], FLAT, "does not name"),
        ([["w", "<f4", [-1, 6], 0]], FLAT, "bad shape"),
        ([["w", "|O", [1], 0]], FLAT, "bad layout entry"),
        ([["w", "<f4", [6], 0]], {"<f4": np.arange(6, dtype=np.float64)}, "not a flat array"),
        ({"w": 1}, FLAT, "bad layout entry"),
        (b"\xff\xfe not json", FLAT, "unreadable layout"),
        (b"[" * 100_000 + b"]" * 100_000, FLAT, "unreadable layout"),  # nesting deeper than Python recurses
        ([["w", "<f4", [2**32, 2**32], 0]], FLAT, "slice outside"),  # 2**64 elements: no wrap-around to 0
    ],
)
def test_a_malformed_packed_record_is_refused_with_a_reason(layout, flats, reason):
    with pytest.raises(ValueError, match=reason):
        record_to_arrays(_hostile(layout, flats))


def test_only_numbers_are_packed():
    with pytest.raises(ValueError, match="numbers only"):
        arrays_to_record({"names": np.array(["a", "b"])})
