"""Flower simulation of three tiny sites (liver, spleen, kidney), 2 rounds: head-aware FedBN and
FedAvg aggregation checked against the recorded replies, BatchNorm kept and restored on site,
and nothing but parameters and scalar metrics leaving a site."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from federated_tiny import TINY_NETWORK, TINY_PREPROCESSING, tiny_training

from SegVizLogic.bundle import FEDBN_DEFAULT_BATCHNORM, load_bundle
from SegVizLogic.federated.client_app import THRESHOLD_RECORD
from SegVizLogic.federated.simulation import run_federated_simulation, simulation_available
from SegVizLogic.federated.strategy import update_from_content
from SegVizLogic.network import build_network, partition_state
from SegVizLogic.progress import ProgressReporter, parse_progress_line

pytestmark = pytest.mark.skipif(not simulation_available(), reason="Flower's simulation engine needs ray")


def recording_mod(folder: str):
    """A client mod that pickles a summary of every message a site receives and sends."""

    def mod(message, context, call_next):
        from SegVizLogic.federated.transfer import content_groups

        reply = call_next(message, context)
        site = Path(str(context.node_config["partition-id"]))

        def summary(content):
            return {
                "arrays": content_groups(content),
                "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
                "configs": {name: dict(rec) for name, rec in content.config_records.items()},
            }

        record = {
            "partition": int(str(site)),
            "round": int(message.content.config_records["config"]["server-round"]),
            "type": message.metadata.message_type,  # train, or evaluate: the threshold question
            "received": summary(message.content),
            "sent": summary(reply.content),
        }
        path = Path(folder) / f"{record['partition']}-{record['round']}-{record['type']}.pkl"
        path.write_bytes(pickle.dumps(record))
        return reply

    return mod


def _run(sites, out, strategy, tmp_path):
    records = tmp_path / f"records-{strategy}"
    records.mkdir()
    rounds: dict[int, dict] = {}

    def on_round(server_round, replies, partition):
        rounds[server_round] = {
            "updates": [update_from_content(r.content) for r in replies if not r.has_error()],
            "global": {g: {k: np.array(v) for k, v in arrays.items()} for g, arrays in partition.items()},
        }

    lines = tmp_path / f"progress-{strategy}.jsonl"
    with open(lines, "w", encoding="utf-8") as stream:
        path = run_federated_simulation(
            sites,
            out,
            rounds=2,
            local_epochs=1,
            strategy=strategy,
            weighting="examples",
            lr=1e-2,
            preprocessing=TINY_PREPROCESSING,
            training_config=tiny_training(),
            network_config=TINY_NETWORK,
            reporter=ProgressReporter("json", stream=stream),
            seed=0,
            device="cpu",
            client_mods=[recording_mod(str(records))],
            on_round=on_round,
        )
    events = [e for e in map(parse_progress_line, lines.read_text(encoding="utf-8").splitlines()) if e]
    sent = {
        (r["partition"], r["round"], r["type"]): r
        for r in (pickle.loads(p.read_bytes()) for p in records.glob("*.pkl"))
    }
    return path, rounds, sent, events


@pytest.fixture(scope="module")
def fedbn(phantom_root, tmp_path_factory):
    import shutil

    tmp = tmp_path_factory.mktemp("fedbn")
    sites = [shutil.copytree(phantom_root / n, tmp / n) for n in ("site-liver", "site-spleen", "site-kidney")]
    return (sites, *_run(sites, tmp / "out", "fedbn", tmp))


@pytest.fixture(scope="module")
def fedavg(phantom_root, tmp_path_factory):
    import shutil

    tmp = tmp_path_factory.mktemp("fedavg")
    sites = [shutil.copytree(phantom_root / n, tmp / n) for n in ("site-liver", "site-spleen", "site-kidney")]
    return (sites, *_run(sites, tmp / "out", "fedavg", tmp))


def _weighted(updates, group):
    counts = np.array([u.num_examples for u in updates], float)
    weights = counts / counts.sum()
    keys = updates[0].partition[group]
    return {k: sum(w * u.partition[group][k].astype(np.float64) for w, u in zip(weights, updates)) for k in keys}


def test_fedbn_shared_is_the_weighted_average_of_the_replies(fedbn):
    _, _path, rounds, sent, _events = fedbn
    for record in rounds.values():
        assert len(record["updates"]) == 3
        expected = _weighted(record["updates"], "shared")
        for key, value in record["global"]["shared"].items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-7)
    # the replies the server aggregated are exactly what the clients sent
    for update in rounds[2]["updates"]:
        partition = next(
            p
            for (p, r, kind), rec in sent.items()
            if (r, kind) == (2, "train") and rec["sent"]["configs"]["site"]["name"] == update.site
        )
        for key, value in update.partition["shared"].items():
            np.testing.assert_array_equal(value, sent[(partition, 2, "train")]["sent"]["arrays"]["shared"][key])


def test_fedbn_heads_change_only_where_their_organ_was_trained(fedbn):
    _, path, rounds, _, _ = fedbn
    initial = partition_state(build_network(TINY_NETWORK))
    bundle = load_bundle(path)
    for key, value in initial["head:pancreas"].items():
        # nobody annotates the pancreas: its head is the (seeded) initial one, in every round
        np.testing.assert_array_equal(
            rounds[1]["global"]["head:pancreas"][key], rounds[2]["global"]["head:pancreas"][key]
        )
        np.testing.assert_array_equal(bundle.state[key], rounds[2]["global"]["head:pancreas"][key])
    for record in rounds.values():
        for update in record["updates"]:
            (organ,) = update.organs
            # FedBN, heads averaged over the sites that annotate them (the default): no batchnorm, own head only
            assert set(update.partition) == {"shared", f"head:{organ}"}
            for key, value in update.partition[f"head:{organ}"].items():
                np.testing.assert_array_equal(record["global"][f"head:{organ}"][key], value)
    changed = [
        k
        for k in initial["head:liver"]
        if not np.array_equal(rounds[2]["global"]["head:liver"][k], rounds[1]["global"]["head:liver"][k])
    ]
    assert changed, "the liver head did not train"


def test_fedbn_batchnorm_stays_on_site_and_is_restored(fedbn):
    sites, path, _rounds, sent, _ = fedbn
    by_site = {}
    for (partition, server_round, kind), record in sent.items():
        if kind != "train":
            continue  # the threshold question after the final round (its own test)
        assert "batchnorm" not in record["received"]["arrays"], "FedBN must not send BatchNorm to clients"
        assert "batchnorm" not in record["sent"]["arrays"]
        if server_round == 1:
            assert "final-batchnorm" not in record["sent"]["arrays"], "BatchNorm may leave only with the final reply"
            assert record["sent"]["metrics"]["metrics"]["batchnorm-restored"] == 0
        else:
            assert record["sent"]["metrics"]["metrics"]["batchnorm-restored"] == 1  # from context.state
            by_site[record["sent"]["configs"]["site"]["name"]] = record["sent"]["arrays"]["final-batchnorm"]
    assert len(by_site) == 3
    mean_key = next(k for k in by_site["site-liver"] if k.endswith("running_mean"))
    count_key = mean_key.replace("running_mean", "num_batches_tracked")
    values = [v[mean_key] for v in by_site.values()]
    assert not np.allclose(values[0], values[1]) and not np.allclose(values[1], values[2])
    for bn in by_site.values():
        # one step per round: 2 batches tracked means round 2 continued round 1's BatchNorm
        assert int(np.asarray(bn[count_key]).reshape(())) == 2
    bundle = load_bundle(path)
    assert set(bundle.batchnorm_variants) == {
        "averaged",
        "organ:liver",
        "organ:spleen",
        "organ:kidney",
        "site:site-liver",
        "site:site-spleen",
        "site:site-kidney",
    }
    assert bundle.default_batchnorm == FEDBN_DEFAULT_BATCHNORM  # chosen on validation (docs/METHOD.md)
    np.testing.assert_allclose(
        bundle.batchnorm_variants["site:site-spleen"][mean_key],
        np.asarray(by_site["site-spleen"][mean_key]).reshape(
            bundle.batchnorm_variants["site:site-spleen"][mean_key].shape
        ),
    )
    np.testing.assert_allclose(
        bundle.batchnorm_variants["averaged"][mean_key], np.mean(values, axis=0), rtol=1e-5, atol=1e-7
    )
    # across runs: the site keeps its BatchNorm and round info on disk
    for site in sites:
        state = json.loads((site / ".segviz" / "federated" / "state.json").read_text(encoding="utf-8"))
        assert state["round"] == 2 and state["strategy"] == "fedbn"
        with np.load(site / ".segviz" / "federated" / "batchnorm.npz") as npz:
            name = json.loads((site / "site.json").read_text(encoding="utf-8"))["name"]
            np.testing.assert_array_equal(npz[mean_key], by_site[name][mean_key])


def test_fedbn_bundles_and_progress(fedbn):
    _, path, _rounds, _, events = fedbn
    out = path.parent
    assert (out / "round-001.segviz").is_file() and (out / "round-002.segviz").is_file() and path.name == "model.segviz"
    bundle = load_bundle(path)
    prov = bundle.provenance
    assert prov["strategy"] == "fedbn" and prov["rounds"] == 2 and prov["weighting"] == "examples"
    assert prov["organs_per_site"] == {"site-kidney": ["kidney"], "site-liver": ["liver"], "site-spleen": ["spleen"]}
    history = bundle.metrics["rounds"]
    assert [h["round"] for h in history] == [1, 2]
    assert set(history[-1]["sites"]) == {"site-liver", "site-spleen", "site-kidney"}
    assert set(history[-1]["dice"]) == {"liver", "spleen", "kidney"}
    assert load_bundle(out / "round-001.segviz").default_batchnorm == FEDBN_DEFAULT_BATCHNORM  # not shared yet
    names = [e["event"] for e in events]
    assert names.count("round_started") == 2 and names.count("round_finished") == 2 and names[-1] == "run_finished"
    finished = [e for e in events if e["event"] == "round_finished"]
    assert {"loss", "dice_liver"} <= set(finished[-1]["metrics"])
    # the global model segments all four organs at a new site: every head, every BatchNorm variant
    model = bundle.build_model("averaged")
    import torch

    assert model(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 4, 16, 16, 8)


def test_fedavg_makes_batchnorm_equal_everywhere(fedavg):
    _, path, rounds, sent, _ = fedavg
    for record in rounds.values():
        expected = _weighted(record["updates"], "batchnorm")
        for key, value in record["global"]["batchnorm"].items():
            np.testing.assert_allclose(
                value.astype(np.float64),
                expected[key] if value.dtype.kind == "f" else np.rint(expected[key]),
                rtol=1e-5,
                atol=1e-7,
            )
    received = [
        rec["received"]["arrays"]["batchnorm"] for (p, r, kind), rec in sent.items() if (r, kind) == (2, "train")
    ]
    assert len(received) == 3
    for bn in received:
        for key, value in bn.items():
            np.testing.assert_array_equal(
                np.asarray(value).reshape(rounds[1]["global"]["batchnorm"][key].shape),
                rounds[1]["global"]["batchnorm"][key],
            )
    bundle = load_bundle(path)
    # The model BatchNorm is the federation's average, offered first; the sites' validation chose the default.
    assert bundle.provenance["strategy"] == "fedavg" and "model" in bundle.batchnorm_choices()
    assert bundle.metrics["threshold_validation"]["batchnorm_candidates"][0] == "model"
    for key, value in rounds[2]["global"]["batchnorm"].items():
        np.testing.assert_array_equal(bundle.state[key], value)


def test_nothing_but_parameters_and_scalar_metrics_leaves_a_site(fedbn, fedavg):
    expected_shapes = {k: tuple(v.shape) for k, v in build_network(TINY_NETWORK).state_dict().items()}
    for sites, _, _, sent, _ in (fedbn, fedavg):
        site_paths = [str(s) for s in sites]
        assert sorted(sent) == sorted(
            [(p, r, "train") for p in range(3) for r in (1, 2)] + [(p, 2, "evaluate") for p in range(3)]
        )
        for key, record in sent.items():
            out = record["sent"]
            if key[2] == "evaluate":  # the threshold question: Dice sums and case counts, nothing else
                assert (
                    not out["arrays"] and set(out["configs"]) == {"site"} and set(out["metrics"]) == {THRESHOLD_RECORD}
                )
                scores = out["metrics"][THRESHOLD_RECORD]
                batchnorms = record["received"]["configs"]["config"]["batchnorm-candidates"]
                assert len(scores) == len(batchnorms) * 5 * 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
                )
                organ = out["configs"]["site"]["organs"][0]
                assert set(scores) == {
                    f"{b}|{t}|{organ}|{kind}"
                    for b in batchnorms
                    for t in ("0.5", "0.4", "0.3", "0.2", "0.1")
                    for kind in ("dice-sum", "count")
                }
                assert all(not any(p in k for p in site_paths) and "case" not in k.lower() for k in scores)
                continue
            assert set(out["configs"]) == {"site"} and set(out["metrics"]) == {"metrics"}
            for name, arrays in out["arrays"].items():
                assert name in {"shared", "batchnorm", "final-batchnorm"} or name.startswith("head:"), name
                for key, value in arrays.items():
                    assert key in expected_shapes, key
                    assert int(np.prod(np.shape(value))) == int(np.prod(expected_shapes[key])), key
                    # parameters only: nothing image-shaped (every spatial extent is a 3x3x3 kernel or less)
                    assert np.ndim(value) < 5 or max(np.shape(value)[2:]) <= 3, (key, np.shape(value))
            for value in out["metrics"]["metrics"].values():
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
            site = out["configs"]["site"]
            assert set(site) == {"name", "organs"}
            texts = [site["name"], *site["organs"], *out["metrics"]["metrics"]]
            for text in texts:
                assert "/" not in text and "case" not in text.lower() and not any(p in text for p in site_paths)


def test_a_site_joining_a_resumed_run_starts_from_the_averaged_batchnorm(fedbn, phantom_root, tmp_path):
    """Resumed from the FedBN bundle: a site of the run resumes its own BatchNorm from disk, a
    site that was not in it starts from the bundle's averaged BatchNorm, which only the
    coordinator sends (nothing new leaves a site)."""
    import shutil

    sites, path, rounds, _sent, _ = fedbn
    newcomer = shutil.copytree(phantom_root / "site-pancreas", tmp_path / "site-pancreas")
    restored: dict[str, float] = {}

    def on_round(server_round, replies, partition):
        for reply in replies:
            update = update_from_content(reply.content)
            restored[update.site] = update.metrics["batchnorm-restored"]

    run_federated_simulation(
        [sites[0], newcomer],
        tmp_path / "out",
        rounds=max(rounds) + 1,  # one round after the run's last
        local_epochs=1,
        preprocessing=TINY_PREPROCESSING,
        training_config=tiny_training(),
        network_config=TINY_NETWORK,
        device="cpu",
        on_round=on_round,
        resume_from=path,
    )
    assert restored == {"site-liver": 2, "site-pancreas": 3}  # 2: its own, from disk; 3: the averaged


def test_the_sites_choose_the_threshold_on_their_validation_cases(fedbn, fedavg):
    """After the final round every site scores the final model with each candidate BatchNorm at each
    candidate threshold on its held-out validation cases; the ServerApp picks by the same rule as an
    experiment on one machine (choose_threshold over the same sites, leave-site-out), before it writes
    the bundle, whose default BatchNorm and threshold are the chosen pair."""
    from SegVizLogic.threshold_selection import THRESHOLD_CANDIDATES, choose_threshold

    for run, offered in ((fedbn, ["adapt", "adapt-organs"]), (fedavg, ["model", "adapt", "adapt-organs"])):
        sites, path, _rounds, sent, events = run
        bundle = load_bundle(path)
        record = bundle.metrics["threshold_validation"]
        assert record["sites"] == ["site-kidney", "site-liver", "site-spleen"] and record["failed"] == {}
        assert record["candidates"] == list(THRESHOLD_CANDIDATES) and record["batchnorm_candidates"] == offered
        assert list(record["table"]) == offered
        assert all(list(rows) == ["0.5", "0.4", "0.3", "0.2", "0.1"] for rows in record["table"].values())
        here = choose_threshold(
            bundle, [str(s) for s in sites], tiny_training().val_fraction, torch.device("cpu"), batchnorms=offered
        )
        chosen = (bundle.default_batchnorm, bundle.threshold, record["table"])
        assert here == chosen == (record["batchnorm"], record["threshold"], record["table"])
        assert bundle.manifest["inference"]["threshold_rule"].startswith("chosen on 3 sites' held-out validation cases")
        # what the sites were sent: the final model (its bytes a valid bundle), the candidates, the run's config
        question = sent[(0, 2, "evaluate")]["received"]
        assert set(question["configs"]) == {"bundle", "config"} and not question["arrays"]
        assert question["configs"]["config"]["threshold-candidates"] == list(THRESHOLD_CANDIDATES)
        assert question["configs"]["config"]["batchnorm-candidates"] == offered
        assert question["configs"]["bundle"]["bundle"][:2] == b"PK"
        stages = [e for e in events if e["event"] == "stage" and e.get("stage") == "threshold"]
        assert len(stages) == 2
        assert f"BatchNorm {bundle.default_batchnorm}, organ threshold {bundle.threshold:g}" in stages[-1]["message"]


def test_a_threshold_answer_is_checked_before_it_counts():
    """A site's answer must hold exactly the asked thresholds for organs that site trained, with counts
    and Dice sums in range; otherwise it is refused (a hostile site cannot add an organ or a value > 1)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from SegVizLogic.federated.server_app import threshold_answer

    candidates, batchnorms = [0.5, 0.3], ["adapt", "adapt-organs"]

    def answer(organs, **scores):
        values = {
            f"{b}|{t:g}|{o}|{kind}": (0.8 if kind == "dice-sum" else 1)
            for b in batchnorms
            for t in candidates
            for o in organs
            for kind in ("dice-sum", "count")
        }
        values.update(scores)
        return RecordDict(
            {THRESHOLD_RECORD: MetricRecord(values), "site": ConfigRecord({"name": "site-liver", "organs": organs})}
        )

    sites = {"site-liver": ["liver"]}
    assert threshold_answer(answer(["liver"]), candidates, batchnorms, sites) == (
        "site-liver",
        {b: {0.5: {"liver": (0.8, 1)}, 0.3: {"liver": (0.8, 1)}} for b in batchnorms},
    )
    bad = {
        "not organs site 'site-liver' trained": answer(["liver", "spleen"]),
        "out of range": answer(["liver"], **{"adapt|0.3|liver|dice-sum": 1.5}),
        "out of range ": answer(["liver"], **{"adapt-organs|0.3|liver|count": 0.5}),
        "do not cover exactly": RecordDict(
            {
                THRESHOLD_RECORD: MetricRecord({"adapt|0.5|liver|dice-sum": 0.5, "adapt|0.5|liver|count": 1}),
                "site": ConfigRecord({"name": "site-liver", "organs": ["liver"]}),
            }
        ),
        "do not cover exactly ": answer(["liver"], **{"model|0.5|liver|dice-sum": 0.5}),  # a BatchNorm not asked
        "no threshold scores": RecordDict({"site": ConfigRecord({"name": "site-liver", "organs": ["liver"]})}),
    }
    for why, content in bad.items():
        with pytest.raises(ValueError, match=why.strip()):
            threshold_answer(content, candidates, batchnorms, sites)
    with pytest.raises(ValueError, match="but this node is 'site-kidney'"):  # answering under another site's name
        threshold_answer(answer(["liver"]), candidates, batchnorms, sites, node_site="site-kidney")
    assert threshold_answer(answer(["liver"]), candidates, batchnorms, sites, node_site="site-liver")[0] == "site-liver"
    # no more cases than the site reported holding out while it trained
    inflated = answer(["liver"], **{"adapt|0.5|liver|count": 2, "adapt|0.5|liver|dice-sum": 2.0})
    assert threshold_answer(inflated, candidates, batchnorms, sites, "site-liver")[1]["adapt"][0.5] == {
        "liver": (2.0, 2)
    }
    with pytest.raises(ValueError, match="2 cases counted, more than the 1 validation cases"):
        threshold_answer(inflated, candidates, batchnorms, sites, "site-liver", max_cases=1)
