"""What goes on the wire: every group of a message packed into a few Flower objects, read back
exactly, and a hostile packed record refused with a reason (no torch, no Flower processes: seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from SegVizLogic.federated.transfer import (
    GROUPS_RECORD,
    PACKED_LAYOUT,
    arrays_to_record,
    content_groups,
    put_groups,
    record_to_arrays,
)


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


def _objects(record: ArrayRecord | RecordDict) -> int:
    """Flower objects of ``record`` (each one HTTP request between a SuperNode and the SuperLink)."""
    return len(get_all_nested_objects(record))


def _train_groups() -> dict[str, dict[str, np.ndarray]]:
    """What a FedBN train message carries: the shared body, four heads, the averaged BatchNorm."""
    rng = np.random.default_rng(1)
    groups = {"shared": _demo_like_group()}
    for organ in ("liver", "spleen", "pancreas", "kidney"):
        groups[f"head:{organ}"] = {
            "head.weight": rng.standard_normal((1, 16, 1, 1, 1)).astype(np.float32),
            "head.bias": rng.standard_normal(1).astype(np.float32),
        }
    groups["averaged-batchnorm"] = {"bn.weight": np.ones(8, np.float32), "bn.num_batches_tracked": np.array(3)}
    return groups


def test_every_group_of_a_message_travels_in_one_record_and_reads_back():
    groups = _train_groups()
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    put_groups(content, groups)
    assert list(content.array_records) == [GROUPS_RECORD]
    back = content_groups(content)
    assert list(back) == list(groups)
    for group, arrays in groups.items():
        assert list(back[group]) == list(arrays)
        for name, value in arrays.items():
            assert back[group][name].dtype == value.dtype
            np.testing.assert_array_equal(back[group][name], value)
    # One record per group (the wire format before): 6 records of 2-3 arrays each.
    per_group = RecordDict({"config": ConfigRecord({"server-round": 1})})
    for group, arrays in groups.items():
        per_group[group] = arrays_to_record(arrays)
    assert content_groups(per_group).keys() == groups.keys()  # records one per group still read
    # The record, three arrays (<f4, <f2, <i8) and the layout with a chunk each, the config, the dict.
    assert _objects(content) <= 11 < 2 * 11 <= _objects(per_group)
    # Putting the groups again replaces the record (a site's clipped reply, a tampering test).
    put_groups(content, {"shared": groups["shared"]})
    assert list(content_groups(content)) == ["shared"]


def test_a_reply_with_its_metrics_is_a_dozen_objects():
    groups = {k: v for k, v in _train_groups().items() if k in ("shared", "head:liver")}
    reply = RecordDict({"metrics": MetricRecord({"loss": 0.5}), "site": ConfigRecord({"name": "site-liver"})})
    put_groups(reply, groups)
    assert _objects(reply) <= 12


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        (["w"], "names no group"),
        (["/w"], "names no group"),
        (["shared/"], "names no group"),
    ],
)
def test_a_packed_key_without_its_group_is_refused(keys, reason):
    content = RecordDict({GROUPS_RECORD: arrays_to_record({k: np.zeros(2, np.float32) for k in keys})})
    with pytest.raises(ValueError, match=reason):
        content_groups(content)


def test_a_group_sent_both_packed_and_on_its_own_is_refused():
    content = RecordDict()
    put_groups(content, {"shared": {"w": np.zeros(2, np.float32)}})
    content["shared"] = arrays_to_record({"w": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="shared sent twice"):
        content_groups(content)


@pytest.mark.parametrize("group", ["", "head/liver"])
def test_a_group_name_that_cannot_be_read_back_is_not_sent(group):
    with pytest.raises(ValueError, match="cannot be sent"):
        put_groups(RecordDict(), {group: {"w": np.zeros(1, np.float32)}})


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
