"""Choosing each arm's test-time options on the training sites' validation cases, and freezing them.

The rule (:func:`select_options`, written out in docs/RESULTS.md):

1. **Candidates.** Every arm is offered the same options: each checkpoint it has (local and central
   models: their best validation epoch, chosen during training; federated models: the rounds in
   ``[selection] checkpoints``), each BatchNorm choice in ``[selection] batchnorm`` that its bundle
   carries (local and central models carry ``model`` and ``adapt``; federated ones also ``averaged``
   and ``per-organ``), each overlap and each threshold.
2. **Validation score.** Each candidate segments every validation case of every training site
   (the cases :func:`~SegVizLogic.training.load_site_data` holds out of training) through the
   inference path (:func:`~SegVizLogic.inference.segment_image`), and is scored by Dice on the organs
   that site annotated. A model is judged only on the sites it trained on (a local model on its own
   site). Per seed: mean over each organ's validation cases, then mean over organs; the candidate's
   score is the mean over seeds.
3. **Leave the site out.** A validation case is segmented with BatchNorm that excludes its own
   site's statistics wherever the bundle holds them per site (:func:`leave_site_out`): the
   ``averaged`` and ``organ:<organ>`` sets are rebuilt from the other sites' BatchNorm, and where no
   other site trained an organ its head takes the other sites' average. A site's own statistics would
   flatter the shared sets, and the external scanner is one no site has. Statistics a bundle holds
   only pooled (a local or central model's own BatchNorm, FedAvg's averaged one) cannot be separated;
   those candidates are marked ``own_statistics`` in results.json.
4. **Choice.** The candidate with the highest score; ties go to the earlier candidate in the order of
   ``[selection]`` (checkpoints, then BatchNorm, overlap, threshold). One choice per arm, the same for
   every seed.
5. **Freeze.** The choices are written to results.json (``"stage": "frozen"``) before the external set
   is opened; the external set is then scored once per arm with them
   (:mod:`~SegVizLogic.experiments.external`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..bundle import ModelBundle, load_bundle
from ..bundle_manifest import batchnorm_choices, read_manifest
from ..evaluation import evaluate_label_maps
from ..inference import segment_image, segment_image_at_thresholds
from ..organs import ORGAN_NAMES, organ_by_name
from ..progress import ProgressReporter
from ..site import Site, load_case, load_site
from .arms import TrainedArm
from .config import ExperimentConfig, SelectionConfig

__all__ = [
    "SCORING_SW_BATCH",
    "SELECTION_RULE",
    "BundleCache",
    "Option",
    "arm_candidates",
    "leave_site_out",
    "score_bundle_on_case",
    "score_on_validation",
    "select_options",
    "validation_cases",
    "validation_scores",
]

SELECTION_RULE = (
    "per arm, the candidate (checkpoint, BatchNorm, overlap, threshold) with the highest validation score: "
    "Dice on each training site's validation cases, on the organs that site annotated, through the inference "
    "path, with BatchNorm that leaves the case's own site out where the bundle holds it per site; mean over "
    "cases per organ, over organs, then over seeds; ties to the earlier candidate in [selection] order; frozen "
    "in results.json before the external set is opened"
)
"""The rule in one sentence (results.json and the report quote it)."""
SCORING_SW_BATCH = 4
"""Windows per network call when the experiments segment a case: the same label maps as one window
at a time (eval mode, running statistics), 2.5x faster for the CPU configs' small networks."""


@dataclass(frozen=True)
class Option:
    """One candidate set of test-time options.

    Args:
        checkpoint: ``best-epoch`` (local, central), ``final`` or ``round-<r>`` (federated).
        batchnorm: a BatchNorm choice of the bundle (``model``, ``adapt``, ``averaged``, ``per-organ``...).
        overlap: sliding-window overlap.
        threshold: probability above which a voxel is an organ.
    """

    checkpoint: str
    batchnorm: str
    overlap: float
    threshold: float

    @property
    def key(self) -> str:
        """A stable name, e.g. ``final, bn=adapt, overlap=0.5, threshold=0.5``."""
        return f"{self.checkpoint}, bn={self.batchnorm}, overlap={self.overlap:g}, threshold={self.threshold:g}"

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "checkpoint": self.checkpoint,
            "batchnorm": self.batchnorm,
            "overlap": self.overlap,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Option:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["checkpoint"]), str(data["batchnorm"]), float(data["overlap"]), float(data["threshold"]))


def _offered(choices: Sequence[str], wanted: Sequence[str]) -> list[str]:
    # A single site's BatchNorm is never a default for a site that is not it.
    usable = [c for c in choices if not c.startswith("site:")]
    if "all" in wanted:
        return usable
    return [c for c in wanted if c in usable]


def arm_candidates(trained: TrainedArm, selection: SelectionConfig) -> list[Option]:
    """The candidates of one arm in ``[selection]`` order, from the BatchNorm its bundles carry."""
    checkpoints = next(iter(trained.models.values()))  # {checkpoint label: bundle path}, in [selection] order
    options = []
    for checkpoint, path in checkpoints.items():
        offered = _offered(batchnorm_choices(read_manifest(path)), selection.batchnorm)
        for bn, overlap, threshold in itertools.product(offered, selection.overlap, selection.threshold):
            options.append(Option(checkpoint, bn, overlap, threshold))
    return options


def leave_site_out(bundle: ModelBundle, site: str, weighting: str = "uniform") -> ModelBundle:
    """``bundle`` as a site that never trained it would get it, for segmenting ``site``'s validation cases.

    When the bundle carries each site's BatchNorm (``site:<name>`` variants, FedBN and FedAvg bundles),
    ``site:<site>`` is dropped and ``averaged`` and every ``organ:<organ>`` are rebuilt from the other
    sites' BatchNorm, weighted as the federation weighted them; an organ no other site trained gets
    the other sites' average. The weights and the ``model`` BatchNorm are untouched. A bundle without
    per-site BatchNorm, or without ``site:<site>``, is returned as is.
    """
    from ..federated.strategy import reply_weights, weighted_average

    own = f"site:{site}"
    if own not in bundle.batchnorm_variants:
        return bundle
    others = {
        name[len("site:") :]: arrays
        for name, arrays in bundle.batchnorm_variants.items()
        if name.startswith("site:") and name != own
    }
    variants: dict[str, dict[str, np.ndarray]] = {f"site:{s}": a for s, a in others.items()}
    if others:
        last_round = (bundle.metrics.get("rounds") or [{}])[-1].get("sites", {})
        counts = {s: int(last_round.get(s, {}).get("num-examples", 1)) for s in others}
        organs_per_site = bundle.provenance.get("organs_per_site", {})

        def average(names: list[str]) -> dict[str, np.ndarray]:
            return weighted_average([others[s] for s in names], reply_weights([counts[s] for s in names], weighting))

        variants["averaged"] = average(sorted(others))
        for organ in bundle.organs:
            trained_it = sorted(s for s in others if organ in organs_per_site.get(s, []))
            variants[f"organ:{organ}"] = average(trained_it) if trained_it else variants["averaged"]
    manifest = {**bundle.manifest, "batchnorm_variants": sorted(variants)}
    return replace(bundle, manifest=manifest, batchnorm_variants=variants)


def validation_cases(site_dirs: Sequence[str], config: ExperimentConfig) -> dict[str, list[str]]:
    """``{site name: validation case names}``: the cases training held out (the same split, from
    :func:`~SegVizLogic.training.load_site_data`, which reads the preprocessing cache)."""
    from ..training import load_site_data

    return {
        data.name: [item["case"] for item in data.val_items]
        for data in (load_site_data(d, config.preprocessing, config.training) for d in site_dirs)
    }


def score_bundle_on_case(
    bundle: ModelBundle,
    image: sitk.Image,
    reference: sitk.Image,
    organs: Sequence[str],
    option: Option,
    device: torch.device,
    hd95: bool = False,
    case_name: str = "case",
) -> tuple[dict[str, dict], sitk.Image]:
    """Segment ``image`` with ``bundle`` and ``option`` (inference path) and score ``organs`` against ``reference``.

    Returns:
        ``({organ: evaluate_label_maps score}, predicted label map)``.
    """
    result = segment_image(
        bundle,
        image,
        device,
        batchnorm=option.batchnorm,
        overlap=option.overlap,
        threshold=option.threshold,
        sw_batch_size=SCORING_SW_BATCH,
    )
    return _score_label_map(result.labels, reference, organs, hd95, case_name), result.labels


def _score_label_map(
    labels: sitk.Image, reference: sitk.Image, organs: Sequence[str], hd95: bool, case_name: str
) -> dict[str, dict]:
    """``{organ: evaluate_label_maps score}`` of a predicted label map against ``reference``."""
    return evaluate_label_maps(
        labels,
        reference,
        {organ_by_name(o).label: o for o in organs},
        organs=organs,
        hd95=hd95,
        pred_path=f"prediction of {case_name}",
        ref_path=f"reference of {case_name}",
    )


class BundleCache:
    """Loaded bundles and their leave-site-out views, so each file is read once per phase."""

    def __init__(self, weighting: str = "uniform") -> None:
        self.weighting = weighting
        self._bundles: dict[str, ModelBundle] = {}
        self._views: dict[tuple[str, str], ModelBundle] = {}

    def get(self, path: str, leave_out: str | None = None) -> ModelBundle:
        """The bundle at ``path``, as seen by a site that never trained it when ``leave_out`` is a site name."""
        if path not in self._bundles:
            self._bundles[path] = load_bundle(path)
        if leave_out is None:
            return self._bundles[path]
        key = (path, leave_out)
        if key not in self._views:
            self._views[key] = leave_site_out(self._bundles[path], leave_out, self.weighting)
        return self._views[key]

    def clear(self) -> None:
        """Forget every bundle (memory)."""
        self._bundles.clear()
        self._views.clear()


def _own_statistics(arm: str, option: Option) -> bool:
    """Whether ``option`` segments a site's validation case with BatchNorm statistics that include that site."""
    return option.batchnorm == "model" and arm != "fedbn"


def _pass_groups(options: Sequence[Option]) -> list[list[Option]]:
    """``options`` grouped by what the network pass depends on (checkpoint, BatchNorm, overlap), in order;
    the options of a group differ only in their threshold."""
    groups: dict[tuple[str, str, float], list[Option]] = {}
    for option in options:
        groups.setdefault((option.checkpoint, option.batchnorm, option.overlap), []).append(option)
    return list(groups.values())


def score_on_validation(
    trained: Sequence[TrainedArm],
    site_dirs: Sequence[str],
    config: ExperimentConfig,
    device: torch.device,
    reporter: ProgressReporter | None = None,
    on_case: Callable[[], None] | None = None,
) -> tuple[list[dict], dict[str, list[Option]]]:
    """Score every candidate of every trained arm on the sites' validation cases.

    Returns:
        ``(records, candidates)``: one record per (arm, model, seed, candidate, site, case, organ)
        ``{"arm", "model", "seed", "option", "site", "case", "organ", "dice"}``, and each arm's candidates.
    """
    reporter = reporter or ProgressReporter("none")
    sites: dict[str, Site] = {s.name: s for s in (load_site(d) for d in site_dirs)}
    held_out = validation_cases(site_dirs, config)
    if not any(held_out.values()):
        raise ValueError(
            "no validation cases: every site's cases are all used for training (raise [training] val_fraction "
            "or give the sites more cases); test-time options cannot be chosen without them"
        )
    candidates: dict[str, list[Option]] = {}
    for t in trained:
        candidates.setdefault(t.arm, arm_candidates(t, config.selection))
    images: dict[tuple[str, str], tuple[sitk.Image, sitk.Image]] = {}
    records: list[dict] = []
    cache = BundleCache(config.federation.weighting)
    total = sum(
        len(candidates[t.arm]) * sum(len(held_out[s]) for s in t.model_sites[m]) for t in trained for m in t.models
    )
    with reporter.task("validation", total=total) as advance:
        for t in trained:
            for model, checkpoints in t.models.items():
                for site_name in t.model_sites[model]:
                    site = sites[site_name]
                    for case_name in held_out[site_name]:
                        if (site_name, case_name) not in images:
                            case = next(c for c in site.cases if c.name == case_name)
                            images[(site_name, case_name)] = load_case(case, site)
                        image, reference = images[(site_name, case_name)]
                        for group in _pass_groups(candidates[t.arm]):
                            first = group[0]
                            bundle = cache.get(checkpoints[first.checkpoint], leave_out=site_name)
                            if first.batchnorm not in bundle.batchnorm_choices():
                                advance(len(group))
                                continue  # e.g. per-organ of a one-site federation: not scoreable here
                            # One network pass per (checkpoint, BatchNorm, overlap); each threshold labels it.
                            maps = segment_image_at_thresholds(
                                bundle,
                                image,
                                device,
                                [o.threshold for o in group],
                                batchnorm=first.batchnorm,
                                overlap=first.overlap,
                                sw_batch_size=SCORING_SW_BATCH,
                            )
                            for option in group:
                                scores = _score_label_map(
                                    maps[option.threshold], reference, site.organs, False, case_name
                                )
                                records.extend(
                                    {
                                        "arm": t.arm,
                                        "model": model,
                                        "seed": t.seed,
                                        "option": option.key,
                                        "site": site_name,
                                        "case": case_name,
                                        "organ": organ,
                                        "dice": score["dice"],
                                    }
                                    for organ, score in scores.items()
                                    if score.get("dice") is not None
                                )
                                advance(1)
                                if on_case is not None:
                                    on_case()
            cache.clear()
    return records, candidates


def validation_scores(
    records: Iterable[Mapping], candidates: Mapping[str, Sequence[Option]], seeds: Sequence[int]
) -> dict[str, dict[str, dict]]:
    """Each arm's candidates with their validation score (rule step 2).

    Returns:
        ``{arm: {option key: {"option", "score", "per_organ", "per_seed", "n", "complete", "own_statistics"}}}``
        in candidate order; ``score`` is None for a candidate not scored on every seed (``complete`` false).
    """
    records = list(records)
    out: dict[str, dict[str, dict]] = {}
    for arm, options in candidates.items():
        out[arm] = {}
        arm_records = [r for r in records if r["arm"] == arm]
        expected = {(r["seed"], r["model"], r["site"], r["case"], r["organ"]) for r in arm_records}
        for option in options:
            rows = [r for r in arm_records if r["option"] == option.key]
            have = {(r["seed"], r["model"], r["site"], r["case"], r["organ"]) for r in rows}
            per_seed, per_organ_seed = {}, {}
            for seed in seeds:
                organs = {}
                for organ in ORGAN_NAMES:
                    values = [r["dice"] for r in rows if r["seed"] == seed and r["organ"] == organ]
                    if values:
                        organs[organ] = float(np.mean(values))
                if organs:
                    per_seed[seed] = float(np.mean(list(organs.values())))
                    per_organ_seed[seed] = organs
            complete = bool(rows) and have == expected and len(per_seed) == len(seeds)
            per_organ = {
                organ: float(np.mean([o[organ] for o in per_organ_seed.values() if organ in o]))
                for organ in ORGAN_NAMES
                if any(organ in o for o in per_organ_seed.values())
            }
            out[arm][option.key] = {
                "option": option.to_dict(),
                "score": float(np.mean(list(per_seed.values()))) if complete else None,
                "per_organ": per_organ,
                "per_seed": {str(s): v for s, v in per_seed.items()},
                "n": len(rows),
                "complete": complete,
                "own_statistics": _own_statistics(arm, option),
            }
    return out


def select_options(scores: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict]:
    """THE selection rule (rule step 4): per arm, the highest-scoring complete candidate; ties go to
    the earlier candidate.

    Args:
        scores: :func:`validation_scores`' output (candidates in ``[selection]`` order).

    Returns:
        ``{arm: {"key", "option", "validation_score", "per_organ", "candidates": n}}``.

    Raises:
        ValueError: an arm has no candidate scored on every seed and validation case.

    Example::

        select_options({"fedbn": {"a": {"option": {...}, "score": 0.7, ...}, "b": {"option": {...}, "score": 0.7, ...}}})
        # {"fedbn": {"key": "a", ...}}  (the tie goes to the earlier candidate)
    """
    chosen = {}
    for arm, candidates in scores.items():
        scored = [(key, c) for key, c in candidates.items() if c.get("score") is not None]
        if not scored:
            raise ValueError(f"{arm}: no candidate could be scored on every validation case")
        best = max(c["score"] for _, c in scored)
        key, c = next((k, c) for k, c in scored if c["score"] == best)
        chosen[arm] = {
            "key": key,
            "option": dict(c["option"]),
            "validation_score": c["score"],
            "per_organ": dict(c["per_organ"]),
            "candidates": len(candidates),
        }
    return chosen
