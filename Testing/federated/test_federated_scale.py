"""Rounds for many sites in real simulation-engine runs of three tiny sites: a seeded sample of
the sites trains each round (``fraction_train``), a round stops waiting for a late site at its
deadline and names it, and ``transfer_dtype = "float16"`` halves the shared body on the wire
while the coordinator keeps float32 master weights."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from federated_tiny import SITE_NAMES, TINY_NETWORK, tiny_run_options

from SegVizLogic.bundle import load_bundle
from SegVizLogic.federated.simulation import run_federated_simulation, simulation_available
from SegVizLogic.network import build_network, partition_state

pytestmark = pytest.mark.skipif(not simulation_available(), reason="Flower's simulation engine needs ray")


def recording_mod(folder: str, slow_partition: int = -1, slow_round: int = 0, sleep: float = 0.0):
    """A client mod that records the dtypes a site receives and sends, and makes one site late."""

    def mod(message, context, call_next):
        from SegVizLogic.federated.transfer import content_groups

        if message.metadata.message_type != "train":
            return call_next(message, context)  # the threshold question after the final round
        partition = int(context.node_config["partition-id"])
        server_round = int(message.content.config_records["config"]["server-round"])
        if partition == slow_partition and server_round == slow_round:
            time.sleep(sleep)
        reply = call_next(message, context)

        def dtypes(content):
            return {
                name: {k: v.dtype.str for k, v in arrays.items()} for name, arrays in content_groups(content).items()
            }

        record = {"received": dtypes(message.content), "sent": dtypes(reply.content)}
        (Path(folder) / f"{partition}-{server_round}.pkl").write_bytes(pickle.dumps(record))
        return reply

    return mod


def _simulate(sites, out, mod, on_round=None, **options):
    return run_federated_simulation(
        sites, out, **tiny_run_options(engine="simulation", client_mods=[mod], on_round=on_round, **options)
    )


def test_a_seeded_sample_trains_each_round_in_float16_and_the_coordinator_keeps_float32(make_sites, tmp_path):
    """All 3 sites connected (min_clients), fraction 0.5: ceil(1.5) = 2 train each round, the
    third gets no message; one usable reply would do (min_train_nodes)."""
    records = tmp_path / "records"
    records.mkdir()
    globals_: dict[int, dict] = {}

    def on_round(server_round, replies, partition):
        globals_[server_round] = {g: {k: np.array(v) for k, v in a.items()} for g, a in partition.items()}

    path = _simulate(
        make_sites(),
        tmp_path / "out",
        recording_mod(str(records)),
        on_round,
        fraction_train=0.5,
        min_train_nodes=1,
        transfer_dtype="float16",
    )
    bundle = load_bundle(path)
    rounds = bundle.metrics["rounds"]
    trained = {r: {int(p.name.split("-")[0]) for p in records.glob(f"*-{r}.pkl")} for r in (1, 2)}
    for entry in rounds:
        assert entry["sampled"] == {"connected": 3, "trained": 2}
        assert len(entry["sites"]) == 2 and not entry["dropped"] and not entry["rejected"]
        assert set(entry["sites"]) == {SITE_NAMES[p] for p in trained[entry["round"]]}
    # the threshold question goes to every connected site, sampled in the last round or not
    assert bundle.metrics["threshold_validation"]["sites"] == sorted(SITE_NAMES)
    # float16 both ways for the shared body only
    for path_ in records.glob("*.pkl"):
        record = pickle.loads(path_.read_bytes())
        for direction in ("received", "sent"):
            assert set(record[direction]["shared"].values()) == {"<f2"}, direction
            heads = [g for g in record[direction] if g.startswith("head:")]
            assert heads and all(set(record[direction][g].values()) == {"<f4"} for g in heads)
    # the bytes: the shared body at 2 bytes a weight; the rest (heads, config) as in float32
    initial = partition_state(build_network(TINY_NETWORK))
    shared_bytes = sum(v.nbytes for v in initial["shared"].values())
    heads_bytes = sum(v.nbytes for g, a in initial.items() if g.startswith("head:") for v in a.values())
    sent = rounds[0]["bytes"]["to_each_site"]
    # the config record (a few kB) fits in the margin; a float32 body would not
    assert shared_bytes / 2 + heads_bytes <= sent < shared_bytes + heads_bytes, (sent, shared_bytes, heads_bytes)
    for received in rounds[0]["bytes"]["from_site"].values():
        assert received < shared_bytes + heads_bytes
    # master weights: float32, and not rounded to float16 (the average of float16 bodies is not one)
    final = globals_[2]["shared"]
    weights = [v for v in final.values() if v.dtype.kind == "f" and v.size > 100]
    assert all(v.dtype == np.float32 for v in final.values() if v.dtype.kind == "f")
    assert any(not np.array_equal(v, v.astype(np.float16).astype(np.float32)) for v in weights)
    assert all(np.asarray(v).dtype == np.float32 for k, v in bundle.state.items() if np.asarray(v).dtype.kind == "f")


def test_a_late_site_is_dropped_at_the_round_deadline_and_named(make_sites, tmp_path):
    """Round 2: site-kidney sleeps 45 s; the round waits 10 s after the 2 replies it needs."""
    records = tmp_path / "records"
    records.mkdir()
    path = _simulate(
        make_sites(),
        tmp_path / "out",
        recording_mod(str(records), slow_partition=2, slow_round=2, sleep=45.0),
        min_clients=2,
        round_deadline=10.0,
        sites_at_once=3,
    )
    rounds = load_bundle(path).metrics["rounds"]
    assert set(rounds[0]["sites"]) == set(SITE_NAMES) and not rounds[0]["dropped"]
    assert set(rounds[1]["sites"]) == {"site-liver", "site-spleen"}
    assert list(rounds[1]["dropped"]) == ["site-kidney"]
    assert rounds[1]["dropped"]["site-kidney"].startswith("late: no reply within the round deadline (10 s")
    # the round did not wait for the late site
    assert rounds[1]["seconds"]["wire_and_clients"] < 40, rounds[1]["seconds"]
