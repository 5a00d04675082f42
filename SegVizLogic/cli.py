"""The ``segviz`` command line: phantom, train, infer, evaluate, organs, model-info, demo,
federation and experiment."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NoReturn

from .errors import SegVizError, SegVizInputError
from .organs import ORGANS
from .training_setup import add_setup_arguments

__all__ = ["add_progress_argument", "build_parser", "infer_from_args", "main", "triple_argument"]


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress rich|json|none`` (every long-running command has it)."""
    parser.add_argument(
        "--progress",
        choices=("rich", "json", "none"),
        default="rich",
        help="progress bars for people (rich), JSON lines for the Slicer module (json), or none",
    )


def triple_argument(kind):
    """argparse type for ``1.5,1.5,2`` or ``1.5`` (three values of ``kind``)."""

    def parse(text: str):
        parts = [kind(p) for p in text.replace("x", ",").split(",") if p]
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected one or three numbers like 1.5,1.5,2 — got {text!r}")
        return tuple(parts)

    return parse


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        type=Path,
        default=None,
        help="the federation's federation-trust.yaml, to tell whether the bundle is signed by the federation "
        "(default: $SEGVIZ_TRUST, else ~/.segviz/federation-trust.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``segviz`` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="segviz", description="Federated multi-organ CT segmentation (SegViz, FedBN)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("organs", help="list the organ schema: label value, name, SNOMED CT code, colour")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_organs)

    p = sub.add_parser("phantom", help="write deterministic synthetic CT sites (the embedded default data)")
    p.add_argument("--out", required=True, type=Path, help="folder to create (one sub-folder per site, plus external/)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="small",
        help="small: CPU demo; full: real CT resolution for GPU runs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases-per-site", type=int, default=None)
    p.add_argument("--external-cases", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    add_progress_argument(p)
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("validate-site", help="check a site folder (site.json, pairs, geometry, labels, CT-likeness)")
    p.add_argument("site", type=Path)
    p.set_defaults(func=_cmd_validate_site)

    p = sub.add_parser(
        "train",
        help="train on one site, or on several pooled sites (central training)",
        description="Train a local model (one --site) or a central model (several, pooled) and write the "
        "best-validation epoch as a model bundle. The setup comes from --preset or --config; flags override it.",
    )
    p.add_argument("--site", action="append", required=True, type=Path, help="site folder (repeat to pool sites)")
    p.add_argument("--out", required=True, type=Path, help="model bundle to write (*.segviz)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="write a bundle after every epoch here")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_progress_argument(p)
    add_setup_arguments(p, "train")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("infer", help="segment a CT volume with a model bundle")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument(
        "--input", required=True, type=Path, help="CT: .nii/.nii.gz/.nrrd/.mha file or a DICOM series folder"
    )
    p.add_argument("--output", required=True, type=Path, help="label map to write (.nii.gz, .nrrd, .mha)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--batchnorm",
        default=None,
        help="BatchNorm for a new site: model, per-organ, averaged, adapt, adapt-organs, organ:<o>, site:<s> (default: the bundle's)",
    )
    p.add_argument(
        "--threshold",
        type=_probability,
        default=None,
        help="label an organ where its probability is the highest and above this (default: the bundle's, chosen on "
        "validation where model-info says so)",
    )
    p.add_argument(
        "--no-cleanup", action="store_true", help="keep every connected component (default keeps the largest per organ)"
    )
    p.add_argument("--stats", type=Path, default=None, help="write organ volumes (mL) as JSON")
    p.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="DICOM Series Instance UID to segment, for a folder with several series (a NIfTI/NRRD/MHA file has one)",
    )
    p.add_argument(
        "--allow-nonstandard-intensities",
        action="store_true",
        help="segment an image whose values are not Hounsfield units (NaN, infinite or constant images are refused regardless)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="the reference path: float32 on every window of the whole grid, each organ's probability resampled onto "
        "the input grid (slower; the default fast path gives the same label map up to bfloat16 rounding: "
        "docs/BENCHMARKS.md)",
    )
    _add_trust_argument(p)
    p.add_argument("--force", action="store_true", help="overwrite --output / --stats (never the input)")
    add_progress_argument(p)
    # Everything infer makes is written and closed when it returns, and it leaves no thread or child
    # running: the command skips the interpreter's finalisation (see entry_point).
    p.set_defaults(func=_cmd_infer, skip_finalisation=True)

    p = sub.add_parser(
        "serve",
        help="a warm inference worker: JSON-line requests on stdin (the options of infer), events on stdout",
        description="Keep torch, MONAI and the model bundles loaded and segment one CT per request. Each stdin line "
        'is a JSON object with the options of `segviz infer` (e.g. {"id": "1", "model": "m.segviz", "input": '
        '"ct.nii.gz", "output": "labels.nii.gz", "force": true}); the worker answers with JSON-line events on stdout, '
        'each carrying the request\'s "id", ending with "done" or "error" (the same refusals as infer). '
        '{"command": "shutdown"} or the end of stdin stops it.',
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "evaluate",
        help="Dice, HD95 and volume difference per organ of predictions against references (files or folders)",
        description="Score a prediction against a reference, or a folder of predictions against a folder of "
        "references paired by case name. A reference that stores the same voxels in another orientation is "
        "compared on the prediction's grid exactly; one on another grid is refused unless --resample-ref.",
    )
    p.add_argument("--pred", required=True, type=Path, help="predicted label map, or a folder of them")
    p.add_argument("--ref", required=True, type=Path, help="reference label map, or a folder of them (same case names)")
    p.add_argument(
        "--ref-map",
        default=None,
        help="reference values per organ, e.g. liver=5,spleen=1,pancreas=7,kidney=2+3 (TotalSegmentator); "
        "organs not named are left out (default: SegViz values 1-4)",
    )
    p.add_argument(
        "--pred-map", default=None, help="prediction values per organ, for another tool's prediction (default: SegViz)"
    )
    p.add_argument(
        "--resample-ref",
        action="store_true",
        help="resample a reference on another grid onto the prediction's grid (nearest neighbour); the report says so",
    )
    p.add_argument("--json", type=Path, default=None, help="write every score, the means and notes as JSON")
    p.add_argument("--csv", type=Path, default=None, help="write the table: one row per case and organ, then means")
    p.add_argument("--png", type=Path, default=None, help="write a figure of the per-case Dice, HD95 and volume error")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest score)")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    add_progress_argument(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "model-info",
        help="show how a model bundle was trained: every setting, sites and held-out case counts, BatchNorm "
        "choices, validation metrics",
    )
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true")
    _add_trust_argument(p)
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser(
        "demo",
        help="the main job on the embedded phantom: federated FedBN training of four single-organ sites, evaluated on an external set",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    add_progress_argument(p)
    p.set_defaults(func=_cmd_demo)

    try:
        from .federated.cli import add_federation_commands
    except ImportError as error:  # the federation needs flwr; everything else does not
        reason = str(error)  # ``error`` is unbound once the except block ends
        p = sub.add_parser("federation", help=f"federated training (unavailable: {reason})")
        p.set_defaults(func=lambda args: _fail(f"federation commands need flwr: {reason}"))
    else:
        add_federation_commands(sub)

    try:
        from .experiments.cli import add_experiment_command
    except ImportError:
        pass
    else:
        add_experiment_command(sub)
    return parser


def _fail(message: str) -> int:
    raise SegVizError(message)


def _reporter(args):
    from .progress import ProgressReporter

    return ProgressReporter(getattr(args, "progress", "rich"))


def _cmd_organs(args) -> int:
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "label": o.label,
                        "name": o.name,
                        "snomed_code": o.snomed_code,
                        "snomed_meaning": o.snomed_meaning,
                        "colour": list(o.colour),
                    }
                    for o in ORGANS
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'label':>5}  {'organ':<9} {'SNOMED CT':<10} colour")
    for o in ORGANS:
        print(f"{o.label:>5}  {o.name:<9} {o.snomed_code:<10} {o.colour[0]},{o.colour[1]},{o.colour[2]}")
    return 0


def _cmd_phantom(args) -> int:
    from .phantom import generate_phantom_sites

    reporter = _reporter(args)
    layout = generate_phantom_sites(
        args.out,
        size=args.size,
        seed=args.seed,
        cases_per_site=args.cases_per_site,
        external_cases=args.external_cases,
        force=args.force,
        progress=reporter,
    )
    reporter.emit("done", outputs={"sites": [str(s) for s in layout.sites], "external": str(layout.external)})
    if reporter.mode != "json":
        print("\n".join([*(str(s) for s in layout.sites), str(layout.external)]))
    return 0


def _cmd_validate_site(args) -> int:
    from .site import SiteValidationError, validate_site

    try:
        site = validate_site(args.site)
    except SiteValidationError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{site.root}: site {site.name!r}, {len(site.cases)} cases, organs {', '.join(site.organs)}: valid")
    return 0


def _cmd_train(args) -> int:
    from .local_training import train_bundle
    from .training_setup import setup_from_args

    setup = setup_from_args(args)
    # The naive pooled baseline competes organs against background in one softmax; the
    # partial-label model gives each organ its own sigmoid.
    setup = setup.override(
        {"network": {"output": "softmax" if setup.training.label_mode == "naive" else "sigmoid"}}, source=setup.source
    )
    epochs = args.epochs if args.epochs is not None else setup.total_epochs
    reporter = _reporter(args)
    path = train_bundle(
        args.site,
        args.out,
        network=setup.network,
        preprocessing=setup.preprocessing,
        training=setup.training,
        epochs=epochs,
        lr=setup.federation.lr,
        device=args.device,
        reporter=reporter,
        checkpoint_dir=args.checkpoint_dir,
        force=args.force,
        setup_source=setup.source,
    )
    reporter.emit("done", outputs={"model": str(path)})
    return 0


def _check_infer_outputs(args) -> None:
    """Every output location of ``infer``, checked before anything is loaded."""
    from .io import WRITE_SUFFIXES
    from .output_paths import check_output_path

    inputs = (args.input, args.model)
    check_output_path(args.output, force=args.force, suffixes=WRITE_SUFFIXES, inputs=inputs)
    if args.stats is not None:
        if args.stats.absolute() == args.output.absolute():
            raise SegVizError(f"{args.stats}: --stats and --output name the same file")
        check_output_path(args.stats, force=args.force, inputs=inputs)


def _read_infer_input(args, bundle, pending_image):
    """The CT to segment (``pending_image``: its read, started early), refused here (before
    inference) if it is not a CT in HU, if the output format cannot keep its grid, or if its
    preprocessed grid would not fit in memory."""
    from .errors import SegVizInputError
    from .io import ct_geometry_problem, ct_intensity_problem, label_format_problem
    from .preprocessing import check_preprocessed_size

    image = pending_image.result()
    problem = ct_geometry_problem(image) or ct_intensity_problem(
        image,
        allow_nonstandard=args.allow_nonstandard_intensities,
        waiver="pass --allow-nonstandard-intensities if this is intended",
    )
    if problem:
        raise SegVizInputError(args.input, problem)
    problem = label_format_problem(image, args.output)
    if problem:
        raise SegVizInputError(args.output, problem)
    check_preprocessed_size(image, bundle.preprocessing, len(bundle.organs), path=args.input)
    return image


def _cmd_infer(args) -> int:
    return infer_from_args(args, _reporter(args))


def _cmd_serve(args) -> int:
    from .serve import serve

    return serve(sys.stdin, sys.stdout)


def infer_from_args(args, reporter, load_bundle=None) -> int:
    """``segviz infer`` with parsed arguments: the one code path of ``infer`` and ``serve``.

    Args:
        args: the parsed ``infer`` arguments.
        reporter: where progress and the result go.
        load_bundle: ``path -> ModelBundle`` (``serve`` passes its cache; default: read the file).

    Raises:
        SegVizError: a refused input, model or output (nothing is written).
    """
    from .io import read_image_ahead

    _check_infer_outputs(args)
    # The CT is read while torch and MONAI are imported and the model loads; its errors are
    # raised below, after the model's, in the order a person fixes them.
    pending_image = read_image_ahead(args.input, series=args.series)
    from .inference import FAST, REFERENCE, organ_volumes_ml, resolve_device, segment_image
    from .io import write_label_map_like
    from .signing import bundle_signature

    if load_bundle is None:
        from .bundle import load_bundle

    if reporter.mode == "json":
        # The Slicer module shows this stage at once; on a terminal nothing is printed before the
        # inputs pass their checks, so that a refusal is the one line a person reads.
        reporter.emit("stage", stage="load", message=f"loading {args.model.name} and {args.input.name}")
    clock = time.perf_counter()
    bundle = load_bundle(args.model)
    signature = bundle_signature(args.model, args.trust)
    if signature.status == "tampered":
        raise SegVizError(f"{args.model}: {signature.message}")
    if args.batchnorm is not None and args.batchnorm not in bundle.batchnorm_choices():
        raise SegVizError(
            f"{args.model}: --batchnorm {args.batchnorm!r} is not available; choose from {', '.join(bundle.batchnorm_choices())}"
        )
    load_model_s = time.perf_counter() - clock
    clock = time.perf_counter()
    image = _read_infer_input(args, bundle, pending_image)
    read_s = time.perf_counter() - clock  # what is left of the read once the model is loaded
    # Said only once the inputs passed their checks (a refusal stays the one line a person reads).
    reporter.emit("stage", stage="signature", message=f"model {signature.message}", signature=signature.to_dict())
    device = resolve_device(args.device)
    result = segment_image(
        bundle,
        image,
        device,
        batchnorm=args.batchnorm,
        cleanup=not args.no_cleanup,
        reporter=reporter,
        threshold=args.threshold,
        levers=REFERENCE if args.exact else FAST,
        sw_batch_size=1 if args.exact else 0,  # 0: from the device's free memory
    )
    clock = time.perf_counter()
    write_label_map_like(result.labels, image, args.output, force=args.force)
    result.timings.update(load_model_s=load_model_s, read_s=read_s, write_s=time.perf_counter() - clock)
    volumes = organ_volumes_ml(result.labels, result.organs)
    outputs = {"labels": str(args.output)}
    if args.stats is not None:
        stats = {"input": str(args.input), "model": str(args.model), "organs": volumes, "timings_s": result.timings}
        _write_json_atomic(args.stats, stats)
        outputs["stats"] = str(args.stats)
    reporter.emit("done", outputs=outputs, organs=volumes)
    if reporter.mode == "rich":
        for name, v in volumes.items():
            print(f"{name:<9} {v['volume_ml']:>9.1f} mL")
    return 0


def _write_json_atomic(path: Path, data) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2))


def _cmd_evaluate(args) -> int:
    from .evaluation import check_report_paths, evaluate_case, pair_cases, parse_ref_map, summarize, write_evaluation
    from .progress import ProgressReporter

    reports = {"json": args.json, "csv": args.csv, "png": args.png}
    check_report_paths(reports, args.force)
    try:
        ref_map = parse_ref_map(args.ref_map, "--ref-map")
        pred_map = parse_ref_map(args.pred_map, "--pred-map") if args.pred_map else None
    except ValueError as error:
        raise SegVizError(str(error)) from None
    for path in (args.pred, args.ref):
        if not path.exists():
            raise SegVizInputError(path, "no such file or folder")
    if args.pred.is_dir() != args.ref.is_dir():
        raise SegVizError(f"--pred {args.pred} and --ref {args.ref}: give two files or two folders")
    if args.pred.is_dir():
        pairs, pred_only, ref_only = pair_cases(args.pred, args.ref)
        if not pairs:
            raise SegVizError(f"{args.pred} and {args.ref}: no case name appears in both folders")
    else:
        pairs, pred_only, ref_only = [(None, args.pred, args.ref)], [], []
    reporter = _reporter(args)
    cases = []
    # A bar for a folder; one case is over before a bar would say anything.
    bar = reporter if len(pairs) > 1 else ProgressReporter("none")
    with bar.task("evaluate", total=len(pairs)) as advance:
        for case, pred, ref in pairs:
            cases.append(
                evaluate_case(
                    pred, ref, ref_map, pred_map, hd95=not args.no_hd95, resample_ref=args.resample_ref, case=case
                )
            )
            advance(1)
    document = write_evaluation(
        cases,
        {"predictions_without_reference": pred_only, "references_without_prediction": ref_only},
        json_path=args.json,
        csv_path=args.csv,
        png_path=args.png,
        sources={"pred": str(args.pred), "ref": str(args.ref), "ref_map": ref_map, "pred_map": pred_map},
    )
    written = {kind: str(path) for kind, path in reports.items() if path is not None}
    if reporter.mode == "json":
        reporter.emit("done", outputs=written, metrics={o: s["dice_mean"] for o, s in document["mean"].items()})
        return 0
    print(_evaluation_text(cases, summarize(cases), pred_only, ref_only))
    return 0


def _number(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _evaluation_text(cases, summary, pred_only, ref_only) -> str:
    """The evaluation for people: the organ table of one case, or per-organ means of many."""
    lines = []
    if len(cases) == 1:
        lines.append(f"{'organ':<9} {'Dice':>6} {'HD95 mm':>8} {'pred mL':>9} {'ref mL':>9} {'diff mL':>9}  status")
        for name, s in cases[0].organs.items():
            lines.append(
                f"{name:<9} {_number(s['dice']):>6} {_number(s['hd95_mm'], 1):>8} {s['pred_ml']:>9.1f} "
                f"{s['ref_ml']:>9.1f} {_number(s['volume_diff_ml'], 1, True):>9}  {s['status']}"
            )
    else:
        lines.append(f"{len(cases)} cases")
        lines.append(
            f"{'organ':<9} {'cases':>5} {'Dice mean':>9} {'sd':>6} {'HD95 mm':>8} {'diff mL':>9} {'diff %':>7}"
        )
        for name, s in summary.items():
            lines.append(
                f"{name:<9} {s['n']:>5} {_number(s['dice_mean']):>9} {_number(s['dice_sd']):>6} "
                f"{_number(s['hd95_mean_mm'], 1):>8} {_number(s['volume_diff_mean_ml'], 1, True):>9} "
                f"{_number(s['volume_diff_mean_percent'], 1, True):>7}"
            )
    for case in cases:
        for note in case.notes:
            lines.append(f"note: {case.case + ': ' if len(cases) > 1 else ''}{note}")
    if pred_only:
        lines.append(f"unmatched: {len(pred_only)} predictions without a reference: {', '.join(pred_only)}")
    if ref_only:
        lines.append(f"unmatched: {len(ref_only)} references without a prediction: {', '.join(ref_only)}")
    return "\n".join(lines)


def _cmd_model_info(args) -> int:
    from .bundle_description import describe_bundle, format_bundle_description
    from .bundle_manifest import read_manifest
    from .signing import bundle_signature

    # The manifest alone describes a bundle: no torch, no weights read.
    info = describe_bundle(read_manifest(args.model), args.model)
    info["signature"] = bundle_signature(args.model, args.trust).to_dict()
    print(json.dumps(info, indent=2) if args.json else format_bundle_description(info))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, force=args.force, device=args.device, seed=args.seed, reporter=_reporter(args))
    return 0


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, like 0.3 — got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The ``segviz`` command in this process; returns the exit status (0 ok, 2 bad input, 1 failure)."""
    return _run(argv)[0]


def _run(argv: list[str] | None) -> tuple[int, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0), args
    except SegVizError as error:
        if getattr(args, "progress", None) == "json":
            from .progress import ProgressReporter

            ProgressReporter("json").emit("error", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2, args
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130, args


def entry_point() -> NoReturn:
    """The ``segviz`` console script: :func:`main`, then the process exits.

    Finalising an interpreter that imported torch and MONAI takes about 0.9 s on 2 cores (modules'
    dictionaries and objects torn down one by one; measured, docs/BENCHMARKS.md). A command marked
    ``skip_finalisation`` has written and closed all it makes when it returns and left no thread or
    child behind, so after flushing the standard streams and logging its process exits at once
    (``os._exit``); every other command exits as usual."""
    status, args = _run(None)
    if getattr(args, "skip_finalisation", False):
        import logging
        import os

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()
