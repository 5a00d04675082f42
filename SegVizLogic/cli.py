"""The ``segviz`` command line: phantom, train, infer, evaluate, organs, model-info, demo,
federation and experiment."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import SegVizError
from .organs import ORGANS

__all__ = ["add_progress_argument", "build_parser", "main", "triple_argument"]


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

    p = sub.add_parser("train", help="train on one site, or on several pooled sites (central training)")
    p.add_argument("--site", action="append", required=True, type=Path, help="site folder (repeat to pool sites)")
    p.add_argument("--out", required=True, type=Path, help="model bundle to write (*.segviz)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--spacing",
        type=triple_argument(float),
        default=(1.5, 1.5, 2.0),
        help="resampling spacing in mm (default 1.5,1.5,2)",
    )
    p.add_argument(
        "--patch",
        type=triple_argument(int),
        default=(128, 128, 32),
        help="training patch in voxels (default 128,128,32)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-case", type=int, default=8)
    p.add_argument(
        "--label-mode",
        choices=("partial", "naive"),
        default="partial",
        help="partial: loss on annotated organs only; naive: the paper's pooled baseline (unannotated = background)",
    )
    p.add_argument("--channels", type=lambda t: tuple(int(c) for c in t.split(",")), default=(16, 32, 64, 128, 256))
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="write a bundle after every epoch here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_progress_argument(p)
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
        help="BatchNorm for a new site: model, per-organ, averaged, adapt, organ:<o>, site:<s> (default: the bundle's)",
    )
    p.add_argument(
        "--no-cleanup", action="store_true", help="keep every connected component (default keeps the largest per organ)"
    )
    p.add_argument("--stats", type=Path, default=None, help="write organ volumes (mL) as JSON")
    _add_trust_argument(p)
    p.add_argument("--force", action="store_true", help="overwrite --output / --stats")
    add_progress_argument(p)
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("evaluate", help="Dice and HD95 per organ of a prediction against a reference")
    p.add_argument("--pred", required=True, type=Path)
    p.add_argument("--ref", required=True, type=Path)
    p.add_argument(
        "--ref-map", default=None, help="reference values per organ, e.g. liver=5,spleen=1,pancreas=7,kidney=2+3"
    )
    p.add_argument("--json", type=Path, default=None, help="write the scores as JSON")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("model-info", help="show a model bundle's organs, rounds, sites, date and settings")
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
    from .network import NetworkConfig
    from .preprocessing import Preprocessing
    from .training import TrainingConfig

    network = NetworkConfig(
        channels=args.channels,
        strides=(2,) * (len(args.channels) - 1),
        output="softmax" if args.label_mode == "naive" else "sigmoid",
    )
    training = TrainingConfig(
        patch_size=args.patch,
        batch_size=args.batch_size,
        samples_per_case=args.samples_per_case,
        label_mode=args.label_mode,
        seed=args.seed,
    )
    reporter = _reporter(args)
    path = train_bundle(
        args.site,
        args.out,
        network=network,
        preprocessing=Preprocessing(spacing=args.spacing),
        training=training,
        epochs=args.epochs,
        lr=args.lr,
        device=args.device,
        reporter=reporter,
        checkpoint_dir=args.checkpoint_dir,
        force=args.force,
    )
    reporter.emit("done", outputs={"model": str(path)})
    return 0


def _cmd_infer(args) -> int:
    from .bundle import load_bundle
    from .inference import organ_volumes_ml, resolve_device, segment_image
    from .io import read_image, write_label_map_like
    from .signing import bundle_signature

    for target in (args.output, args.stats):
        if target is not None and target.exists() and not args.force:
            raise SegVizError(f"{target}: already exists; use --force to overwrite")
    reporter = _reporter(args)
    reporter.emit("stage", stage="load", message=f"loading {args.model.name} and {args.input.name}")
    clock = time.perf_counter()
    bundle = load_bundle(args.model)
    signature = bundle_signature(args.model, args.trust)
    if signature.status == "tampered":
        raise SegVizError(f"{args.model}: {signature.message}")
    reporter.emit("stage", stage="signature", message=f"model {signature.message}", signature=signature.to_dict())
    if args.batchnorm is not None and args.batchnorm not in bundle.batchnorm_choices():
        raise SegVizError(
            f"{args.model}: --batchnorm {args.batchnorm!r} is not available; choose from {', '.join(bundle.batchnorm_choices())}"
        )
    load_model_s = time.perf_counter() - clock
    clock = time.perf_counter()
    image = read_image(args.input)
    read_s = time.perf_counter() - clock
    device = resolve_device(args.device)
    result = segment_image(
        bundle, image, device, batchnorm=args.batchnorm, cleanup=not args.no_cleanup, reporter=reporter
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
    from .evaluation import evaluate_label_maps, parse_ref_map
    from .io import read_label_map

    if args.json is not None and args.json.exists() and not args.force:
        raise SegVizError(f"{args.json}: already exists; use --force to overwrite")
    try:
        ref_map = parse_ref_map(args.ref_map)
    except ValueError as error:
        raise SegVizError(str(error)) from None
    scores = evaluate_label_maps(
        read_label_map(args.pred),
        read_label_map(args.ref),
        ref_map,
        hd95=not args.no_hd95,
        pred_path=str(args.pred),
        ref_path=str(args.ref),
    )
    print(f"{'organ':<9} {'Dice':>6} {'HD95 mm':>8}  status")
    for name, s in scores.items():
        dice = "-" if s["dice"] is None else f"{s['dice']:.3f}"
        hd = "-" if s.get("hd95_mm") is None else f"{s['hd95_mm']:.1f}"
        print(f"{name:<9} {dice:>6} {hd:>8}  {s['status']}")
    if args.json is not None:
        _write_json_atomic(args.json, {"pred": str(args.pred), "ref": str(args.ref), "organs": scores})
    return 0


def _cmd_model_info(args) -> int:
    from .bundle_manifest import batchnorm_choices, read_manifest
    from .signing import bundle_signature

    # The manifest alone describes a bundle: no torch, no weights read.
    manifest = read_manifest(args.model)
    prov = manifest.get("provenance", {})
    info = {
        "path": str(args.model),
        "organs": list(manifest.get("network", {}).get("organs", [])),
        "strategy": prov.get("strategy", "local"),
        "rounds": prov.get("rounds"),
        "sites": prov.get("sites", []),
        "created": manifest.get("created"),
        "segviz_version": manifest.get("segviz_version"),
        "spacing_mm": list(manifest.get("preprocessing", {}).get("spacing", [])),
        "default_batchnorm": manifest.get("default_batchnorm", "model"),
        "batchnorm_choices": batchnorm_choices(manifest),
        "metrics": manifest.get("metrics", {}).get("final", {}),
        "signature": bundle_signature(args.model, args.trust).to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<18} {value['message'] if key == 'signature' else value}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, force=args.force, device=args.device, seed=args.seed, reporter=_reporter(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segviz``; returns the exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SegVizError as error:
        if getattr(args, "progress", None) == "json":
            from .progress import ProgressReporter

            ProgressReporter("json").emit("error", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
