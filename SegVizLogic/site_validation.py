"""Choosing on validation: each site's held-out cases segmented as at a site that never trained.

A federated bundle carries every site's BatchNorm (``site:<name>``). To score a BatchNorm choice
(or a training method) as a new hospital would see it without touching an external set, each
site's validation cases are segmented with a bundle that no longer holds that site's BatchNorm
(:func:`bundle_without_site`): ``averaged`` over the other sites, ``adapt`` starting from that,
and so on. The site's own BatchNorm would be an unfair advantage; it is scored too, as
``own-site``, only to show the ceiling. A site scores the organs it annotated, on its original
grid, through the full inference path (:func:`~SegVizLogic.inference.segment_image`).

Run (the numbers of docs/METHOD.md)::

    python -m SegVizLogic.site_validation --model run/model.segviz --site data/site-liver ... \
        --cases case003 case004 --out scores.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import inference
from .bundle import ModelBundle, load_bundle
from .evaluation import evaluate_label_maps
from .federated.strategy import reply_weights, weighted_average
from .inference import resolve_device, segment_image
from .organs import ORGAN_NAMES, organ_by_name
from .progress import ProgressReporter
from .site import load_case, validate_site

__all__ = ["AVERAGED_ADAPT", "LEGACY_ADAPT", "bundle_without_site", "summarise", "validation_scores"]

LEGACY_ADAPT = "adapt-v0"
"""The test-time adaptation SegViz shipped before: initial BatchNorm (gamma 1, beta 0), statistics
from the first 16 windows in scan order, one window per pass, thin volumes zero-padded; kept here
only to compare."""
AVERAGED_ADAPT = "adapt-from-averaged"
"""Adaptation starting from the sites' averaged BatchNorm (trained gamma and beta kept, statistics
blended with the averaged ones): ``adapt-from-averaged[<prior windows>]``; compared only."""


def bundle_without_site(bundle: ModelBundle, site: str, weighting: str = "uniform") -> ModelBundle:
    """The bundle as a hospital that never trained would get it if ``site`` had not been in the
    federation's BatchNorm: ``averaged`` and ``organ:<organ>`` recomputed from the other sites'
    ``site:<name>`` variants, ``site:<site>`` dropped (weights and heads unchanged).

    Raises:
        ValueError: the bundle carries no ``site:<name>`` BatchNorm, or only ``site``'s.
    """
    sites = {k[len("site:") :]: v for k, v in bundle.batchnorm_variants.items() if k.startswith("site:")}
    if site not in sites:
        raise ValueError(f"{bundle.path}: has no BatchNorm of site {site!r} (sites: {sorted(sites)})")
    others = {name: arrays for name, arrays in sites.items() if name != site}
    if not others:
        raise ValueError(f"{bundle.path}: no other site's BatchNorm to leave {site!r} out with")
    organs_per_site = bundle.provenance.get("organs_per_site", {})
    variants = {"averaged": weighted_average(list(others.values()), reply_weights([1] * len(others), weighting))}
    for organ in ORGAN_NAMES:
        having = [arrays for name, arrays in others.items() if organ in organs_per_site.get(name, [])]
        if having:
            variants[f"organ:{organ}"] = weighted_average(having, reply_weights([1] * len(having), weighting))
    variants.update({f"site:{name}": arrays for name, arrays in others.items()})
    manifest = copy.deepcopy(bundle.manifest)
    manifest["batchnorm_variants"] = sorted(variants)
    return replace(bundle, manifest=manifest, batchnorm_variants=variants)


@torch.no_grad()
def _legacy_adapt(model, image, roi_size, device, max_windows=16, **_ignored) -> int:
    """The adaptation before this version (see :data:`LEGACY_ADAPT`), for the comparison only."""
    from torch import nn

    volume = image if image.dim() == 5 else image[None]
    shape = volume.shape[2:]
    roi = [min(r, s) for r, s in zip(roi_size, shape)]
    divisor = model.config.divisor
    roi = [max(divisor, (r // divisor) * divisor) for r in roi]
    starts = [np.linspace(0, max(s - r, 0), num=max(1, int(np.ceil(s / r))), dtype=int) for s, r in zip(shape, roi)]
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]][:max_windows]
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train().to(device)
    for a, b, c in windows:
        window = volume[:, :, a : a + roi[0], b : b + roi[1], c : c + roi[2]].float()
        pad = [p for s, r in zip(reversed(window.shape[2:]), reversed(roi)) for p in (0, r - s)]
        model(torch.nn.functional.pad(window, pad).to(device))
    model.eval()
    return len(windows)


@contextlib.contextmanager
def _adaptation(prior_windows: float | None = None, legacy: bool = False) -> Iterator[None]:
    """Run ``adapt`` with another prior weight, or as it was before (comparison only)."""
    saved = inference.ADAPT_PRIOR_WINDOWS, inference.adapt_batchnorm
    try:
        if prior_windows is not None:
            inference.ADAPT_PRIOR_WINDOWS = float(prior_windows)
        if legacy:
            inference.adapt_batchnorm = _legacy_adapt
        yield
    finally:
        inference.ADAPT_PRIOR_WINDOWS, inference.adapt_batchnorm = saved


def _choice(bundle: ModelBundle, choice: str) -> tuple[ModelBundle, str, contextlib.AbstractContextManager]:
    """``(bundle, batchnorm, context)`` for a choice name of :func:`validation_scores`."""
    if choice == LEGACY_ADAPT:
        return bundle, "adapt", _adaptation(legacy=True)
    if choice.startswith(AVERAGED_ADAPT + "[") and choice.endswith("]"):
        # The model's BatchNorm replaced by the (other) sites' average: its gamma and beta kept,
        # its statistics the prior of the given weight.
        state = {**bundle.state, **bundle.batchnorm_variants["averaged"]}
        return (
            replace(bundle, state=state),
            "adapt",
            _adaptation(prior_windows=float(choice[len(AVERAGED_ADAPT) + 1 : -1])),
        )
    return bundle, choice, contextlib.nullcontext()


def validation_scores(
    bundle: ModelBundle,
    site_dirs: Sequence[str | Path],
    cases: Sequence[str],
    choices: Sequence[str],
    device: torch.device | str = "cpu",
    reporter: ProgressReporter | None = None,
) -> list[dict]:
    """Dice of each BatchNorm choice on each site's validation cases, leaving the site out.

    Args:
        bundle: a federated bundle with ``site:<name>`` BatchNorm for every site.
        site_dirs: the training sites (their validation cases are scored).
        cases: the case names to score at every site (held out from training).
        choices: bundle BatchNorm choices (``model``, ``averaged``, ``adapt``...) evaluated on
            the leave-site-out bundle, plus ``own-site`` (the site's own BatchNorm: an unfair
            advantage, shown for reference), ``adapt-from-averaged[<k>]``
            (:data:`AVERAGED_ADAPT`) and :data:`LEGACY_ADAPT`.
        device: where the network runs.
        reporter: progress.

    Returns:
        One record per (choice, site, case, organ): ``{"choice", "site", "case", "organ", "dice"}``.
    """
    reporter = reporter or ProgressReporter("none")
    device = resolve_device(device) if isinstance(device, str) else device
    records = []
    for site_dir in site_dirs:
        site = validate_site(site_dir, check_images=False)
        reduced = bundle_without_site(bundle, site.name)
        ref_map = {organ_by_name(o).label: o for o in site.organs}
        chosen = [c for c in site.cases if c.name in set(cases)]
        with reporter.task(f"validate at {site.name}", total=len(chosen) * len(choices)) as advance:
            for case in chosen:
                image, reference = load_case(case, site)
                for choice in choices:
                    if choice == "own-site":
                        target, batchnorm, context = bundle, f"site:{site.name}", contextlib.nullcontext()
                    else:
                        target, batchnorm, context = _choice(reduced, choice)
                    with context:
                        labels = segment_image(target, image, device, batchnorm=batchnorm).labels
                    scores = evaluate_label_maps(labels, reference, ref_map, organs=site.organs, hd95=False)
                    for organ in site.organs:
                        if scores.get(organ, {}).get("dice") is not None:
                            records.append(
                                {
                                    "choice": choice,
                                    "site": site.name,
                                    "case": case.name,
                                    "organ": organ,
                                    "dice": float(scores[organ]["dice"]),
                                }
                            )
                    advance(1)
    return records


def summarise(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """``{choice: {organ: mean Dice, ..., "mean": mean over organs}}`` of :func:`validation_scores`."""
    out: dict[str, dict[str, float]] = {}
    for choice in dict.fromkeys(r["choice"] for r in records):
        per_organ = {}
        for organ in ORGAN_NAMES:
            values = [r["dice"] for r in records if r["choice"] == choice and r["organ"] == organ]
            if values:
                per_organ[organ] = float(np.mean(values))
        per_organ["mean"] = float(np.mean(list(per_organ.values()))) if per_organ else math.nan
        out[choice] = per_organ
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Score BatchNorm choices of a bundle on the sites' validation cases (leave-site-out)."""
    parser = argparse.ArgumentParser(prog="python -m SegVizLogic.site_validation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--site", type=Path, action="append", required=True)
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument(
        "--choices", nargs="+", default=["model", "averaged", LEGACY_ADAPT, f"{AVERAGED_ADAPT}[0]", "adapt", "own-site"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = validation_scores(
        load_bundle(args.model), args.site, args.cases, args.choices, args.device, ProgressReporter("rich")
    )
    summary = summarise(records)
    args.out.write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    for choice, scores in summary.items():
        print(f"{choice:>18} " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
