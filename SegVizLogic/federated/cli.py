"""``segviz federation ...``: simulate, superlink, join, run, certs, node-key, register."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cli import add_progress_argument
from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter
from ..training_setup import TrainingSetup, add_setup_arguments, setup_from_args
from .superlink import DEFAULT_CONTROL_ADDRESS

__all__ = ["FederationProgress", "add_federation_commands"]


class FederationProgress(ProgressReporter):
    """Progress of a federated run for people: a rich bar over rounds, plus one line per
    round with its metrics. ``json`` and ``none`` behave as :class:`ProgressReporter`."""

    def __init__(self, mode: str, rounds: int | None = None) -> None:
        super().__init__(mode)
        self._rounds = rounds
        self._bar = None
        self._task = None

    def emit(self, event: str, **fields: Any) -> None:
        if self.mode != "rich":
            return super().emit(event, **fields)
        if event == "progress":
            return
        if event == "round_started":
            self._ensure_bar(int(fields.get("rounds") or self._rounds or 1))
            self._bar.update(self._task, description=f"round {fields.get('round')}/{fields.get('rounds')}")
            return
        if event == "round_finished":
            self._ensure_bar(int(fields.get("rounds") or self._rounds or 1))
            metrics = fields.get("metrics") or {}
            parts = [
                f"{k.replace('dice_', 'Dice ').replace('dice-', 'Dice ')} {v:.3f}"
                for k, v in metrics.items()
                if isinstance(v, float) and (k == "loss" or k.startswith("dice"))
            ]
            self._bar.console.print(f"round {fields.get('round')}/{fields.get('rounds')}: " + ", ".join(parts))
            self._bar.update(self._task, completed=int(fields.get("round", 0)))
            return
        if event == "run_finished":
            self.close()
            model = (fields.get("outputs") or {}).get("model")
            self._console.print("[bold green]federated run finished[/]" + (f": {model}" if model else ""))
            return
        if event == "update_sent":
            who = f"site {fields['site']}" if "site" in fields else "update"
            self._print(f"  {who} sent its update (round {fields.get('round')}, {fields.get('num_examples')} cases)")
            return
        if event == "connected":
            again = "re" if fields.get("reconnected") else ""
            self._print(f"[green]{again}connected to the SuperLink {fields.get('superlink')}[/]")
            return
        if event == "reconnecting":
            self._print(f"[yellow]{fields.get('message', 'reconnecting')}[/]")
            return
        if event == "site_dropped":
            self._print(
                f"  [yellow]{fields.get('site')} dropped out of round {fields.get('round')}: {fields.get('reason')}[/]"
            )
            return
        if event == "reply_rejected":
            self._print(
                f"  [red]rejected the update of {fields.get('site')} (round {fields.get('round')}): {fields.get('reason')}[/]"
            )
            return
        if event == "waiting":
            self._print(f"[dim]{fields.get('message', 'waiting')}[/]")
            return
        if event == "refused":
            self._print(f"[bold red]{fields.get('message', 'refused a run')}[/]")
            return
        self._print(self._describe(event, fields))

    def _print(self, text: str) -> None:
        (self._bar.console if self._bar is not None else self._console).print(text)

    def _ensure_bar(self, total: int) -> None:
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._bar.start()
            self._task = self._bar.add_task("federation", total=total)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (Slicer's Cancel, ``kill``) into KeyboardInterrupt so child Flower
    processes are stopped by the ``finally`` blocks instead of being orphaned, and make SIGINT
    (Ctrl-C, Slicer's Leave) do so too even when it arrived ignored: a shell without job control
    starts its background commands with SIGINT ignored, and a join started that way could
    otherwise never be told to leave mid-round."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _add_training(parser: argparse.ArgumentParser) -> None:
    """The run's strategy and its training setup (``--preset``/``--config`` and single-field flags)."""
    parser.add_argument(
        "--strategy",
        choices=("fedbn", "fedavg"),
        default="fedbn",
        help="fedbn: BatchNorm stays on each site (default); fedavg: BatchNorm averaged too",
    )
    parser.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=0.0,
        help="differential privacy: Gaussian noise per averaged site update, in clipping norms "
        "(with --dp-clipping-norm; needs uniform weighting; see docs/PRIVACY.md)",
    )
    parser.add_argument(
        "--dp-clipping-norm",
        type=float,
        default=0.0,
        help="differential privacy: each site clips its whole update to this L2 norm",
    )
    parser.add_argument(
        "--no-share-final-batchnorm",
        dest="share_final_batchnorm",
        action="store_false",
        help="FedBN: never send a site's BatchNorm, not even once at the end (bundles then default to adapt)",
    )
    add_setup_arguments(parser, "federation")


def _add_round_options(parser: argparse.ArgumentParser) -> None:
    """Which sites train each round, how long a round waits, and what travels on the wire."""
    parser.add_argument(
        "--fraction-train",
        type=float,
        default=1.0,
        help="share of the connected sites trained each round, sampled with the run's seed (default 1: all)",
    )
    parser.add_argument(
        "--min-train-nodes",
        type=int,
        default=0,
        help="with --fraction-train < 1: sample at least this many sites and need this many usable replies "
        "(default 0: --min-clients)",
    )
    parser.add_argument(
        "--round-deadline",
        type=float,
        default=0.0,
        help="seconds a round waits for more replies once it has the usable replies it needs; later replies are "
        "dropped and named (default 0: wait for every site up to the round timeout)",
    )
    parser.add_argument(
        "--transfer-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="float16: send the shared body both ways in half precision (half the bytes; the coordinator keeps "
        "float32 weights; bench/bench_transfer_dtype.py measures its Dice cost)",
    )
    parser.add_argument(
        "--no-choose-threshold",
        dest="choose_threshold",
        action="store_false",
        help="keep the organ threshold at 0.5 instead of asking the sites, after the final round, which of "
        "0.5-0.1 their validation cases prefer (Dice sums and case counts; always off with differential privacy)",
    )


def _configs(args: argparse.Namespace) -> TrainingSetup:
    """The training setup of a federated run (preset or file, then flags).

    Raises:
        SegVizInputError: an invalid setup, or one a federation cannot train (the naive pooled baseline).
    """
    setup = setup_from_args(args)
    if setup.training.label_mode != "partial" or setup.network.output != "sigmoid":
        raise SegVizInputError(
            args.config,
            "a federation trains with partial labels and one sigmoid per organ; label_mode 'naive' "
            "(softmax) is the pooled baseline of `segviz train`",
        )
    return setup


def _run_settings(args: argparse.Namespace):
    """The :class:`~SegVizLogic.federated.task.FederationSettings` of ``segviz federation run``:
    the training setup mapped onto ``[tool.flwr.app.config]``, plus the run's own options."""
    from .task import FederationSettings

    setup = _configs(args)
    return FederationSettings(
        rounds=setup.federation.rounds,
        local_epochs=setup.federation.local_epochs,
        lr=setup.federation.lr,
        strategy=args.strategy,
        weighting=setup.federation.weighting,
        min_clients=args.min_clients,
        round_timeout=args.round_timeout,
        wait_timeout=args.wait_timeout,
        share_final_batchnorm=args.share_final_batchnorm,
        seed=setup.training.seed,
        network=setup.network,
        training=setup.training.to_dict(),
        preprocessing=setup.preprocessing,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_clipping_norm=args.dp_clipping_norm,
        fraction_train=args.fraction_train,
        min_train_nodes=args.min_train_nodes,
        round_deadline=args.round_deadline,
        transfer_dtype=args.transfer_dtype,
        choose_threshold=args.choose_threshold,
    )


def _tls_group(parser: argparse.ArgumentParser, cert_flag: str, cert_help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(cert_flag, type=Path, default=None, help=cert_help)
    group.add_argument("--insecure", action="store_true", help="no TLS (must be asked for; only on a trusted network)")


def add_federation_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``segviz federation`` and its subcommands on ``subparsers``."""
    federation = subparsers.add_parser(
        "federation", help="federated training with Flower: simulate, or a real federation (superlink, join, run)"
    )
    sub = federation.add_subparsers(dest="federation_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "simulate",
        help="a whole federation on this machine (Flower's simulation engine with Ray, else its deployment engine)",
    )
    p.add_argument(
        "--site", action="append", required=True, type=Path, help="site folder (repeat: one virtual site each)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for round-NNN.segviz and model.segviz")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--engine",
        choices=("auto", "simulation", "deployment"),
        default="auto",
        help="simulation: Flower's simulation engine (needs Ray: pip install 'segviz[simulation]'); deployment: a "
        "SuperLink and one site process each on 127.0.0.1; auto (default): simulation when Ray imports",
    )
    _add_training(p)
    _add_round_options(p)
    add_progress_argument(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("superlink", help="coordinator: start the Flower SuperLink (TLS by default) and keep it running")
    p.add_argument(
        "--address",
        default="0.0.0.0:9093",
        help="HOST:PORT the sites connect to; serves only the Fleet API (default 0.0.0.0:9093)",
    )
    _tls_group(p, "--tls-dir", "folder with ca.crt, server.crt, server.key (from `segviz federation certs`)")
    p.add_argument(
        "--state-dir", type=Path, default=None, help="folder for the SuperLink's log and state (default: temporary)"
    )
    p.add_argument(
        "--control-address",
        default=None,
        help="loopback HOST:PORT of the Control API for `segviz federation run` / `register` "
        "(default 127.0.0.1:<port of --address + 1>; never reachable from other hosts)",
    )
    p.add_argument(
        "--app-registry-port",
        type=int,
        default=None,
        help="loopback port `segviz federation run` serves the signed app on (default: control port + 1)",
    )
    enrolment = p.add_mutually_exclusive_group()
    enrolment.add_argument(
        "--open-enrolment",
        action="store_true",
        help="let any SuperNode that holds ca.crt join (default with TLS: only keys registered with "
        "`segviz federation register`; --insecure implies it)",
    )
    # Node authentication is the default now; the old opt-in flag is still accepted.
    enrolment.add_argument("--require-node-auth", action="store_true", help=argparse.SUPPRESS)
    add_progress_argument(p)
    p.set_defaults(func=_cmd_superlink)

    p = sub.add_parser("join", help="site: join a federation with this site folder (what Slicer's 'Join round' starts)")
    p.add_argument("--superlink", required=True, help="coordinator HOST:PORT")
    p.add_argument("--site", required=True, type=Path, help="the site folder (site.json, images/, labels/)")
    _tls_group(p, "--root-cert", "the federation's ca.crt (from the coordinator)")
    p.add_argument(
        "--trust",
        type=Path,
        default=None,
        help="the federation's federation-trust.yaml (from the coordinator): only apps its key signed run here "
        "(default: federation-trust.yaml next to --root-cert)",
    )
    p.add_argument(
        "--auth-key",
        type=Path,
        default=None,
        help="this site's private key (`segviz federation node-key`), registered by the coordinator",
    )
    p.add_argument(
        "--share-final-batchnorm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="agree to send this site's final-round BatchNorm (feature intensity statistics, no images) when "
        "the coordinator asks, so the model carries BatchNorm for new sites (default: no)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="give up after this many seconds without a connection (default 30)",
    )
    p.add_argument("--once", action="store_true", help="leave after taking part in one complete run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    add_progress_argument(p)
    p.set_defaults(func=_cmd_join)

    p = sub.add_parser(
        "run", help="coordinator: start a federated run on the SuperLink and follow it; bundles land in --out"
    )
    p.add_argument(
        "--superlink",
        default=DEFAULT_CONTROL_ADDRESS,
        help=f"the SuperLink's loopback Control API HOST:PORT (default {DEFAULT_CONTROL_ADDRESS})",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder on the coordinator for round-NNN.segviz, model.segviz, progress.jsonl",
    )
    _tls_group(p, "--root-cert", "the federation's ca.crt")
    p.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="the federation's federation.key: signs the app and every bundle (default: federation.key next to "
        "--root-cert)",
    )
    p.add_argument(
        "--app-registry-port",
        type=int,
        default=None,
        help="the app registry port the SuperLink was started with (default: control port + 1)",
    )
    p.add_argument("--min-clients", type=int, default=2, help="sites needed for a round (default 2)")
    p.add_argument(
        "--wait-timeout", type=float, default=600, help="seconds to wait for --min-clients sites (default 600)"
    )
    p.add_argument(
        "--round-timeout", type=float, default=3600, help="seconds to wait for a round's replies (default 3600)"
    )
    p.add_argument("--timeout", type=float, default=None, help="give up following the run after this many seconds")
    _add_round_options(p)
    p.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        help="continue a run after the round this round-NNN.segviz holds (same lineage, rounds, schedule)",
    )
    p.add_argument(
        "--superlink-grace",
        type=float,
        default=45.0,
        help="give up when the SuperLink has not answered for this many seconds (default 45)",
    )
    p.add_argument(
        "--max-resumes",
        type=int,
        default=3,
        help="continue a run whose ServerApp died (SuperLink restart) from its last round bundle "
        "at most this many times (default 3; 0: never)",
    )
    _add_training(p)
    add_progress_argument(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "certs", help="write the federation's TLS files: ca.crt (for sites), server.crt, server.key (coordinator)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP of the coordinator (repeat); localhost and 127.0.0.1 are always in",
    )
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser(
        "node-key",
        help="site: write an authentication key pair (node.key stays here, node.pub goes to the coordinator)",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_node_key)

    p = sub.add_parser("register", help="coordinator: allow a site's public key (node.pub) to join the SuperLink")
    p.add_argument(
        "--superlink",
        default=DEFAULT_CONTROL_ADDRESS,
        help=f"the SuperLink's loopback Control API (default {DEFAULT_CONTROL_ADDRESS})",
    )
    p.add_argument("--public-key", required=True, type=Path)
    p.add_argument("--root-cert", required=True, type=Path, help="the federation's ca.crt")
    p.add_argument("--name", default=None, help="a name for the site")
    p.set_defaults(func=_cmd_register)
    return federation


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulation import run_federated_simulation

    setup = _configs(args)
    reporter = FederationProgress(args.progress, setup.federation.rounds)
    try:
        path = run_federated_simulation(
            args.site,
            args.out,
            rounds=setup.federation.rounds,
            local_epochs=setup.federation.local_epochs,
            strategy=args.strategy,
            weighting=setup.federation.weighting,
            lr=setup.federation.lr,
            preprocessing=setup.preprocessing,
            training_config=setup.training,
            reporter=reporter,
            seed=setup.training.seed,
            network_config=setup.network,
            share_final_batchnorm=args.share_final_batchnorm,
            device=args.device,
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_clipping_norm=args.dp_clipping_norm,
            engine=args.engine,
            fraction_train=args.fraction_train,
            min_train_nodes=args.min_train_nodes,
            round_deadline=args.round_deadline,
            transfer_dtype=args.transfer_dtype,
            choose_threshold=args.choose_threshold,
        )
    finally:
        reporter.close()
    if args.progress != "json":
        print(path)
    return 0


def _cmd_superlink(args: argparse.Namespace) -> int:
    from .superlink import start_superlink

    reporter = ProgressReporter(args.progress)
    with _terminate_as_interrupt():
        service = start_superlink(
            args.address,
            tls_dir=args.tls_dir,
            insecure=args.insecure,
            state_dir=args.state_dir,
            node_auth=False if args.open_enrolment else None,
            control_address=args.control_address,
            registry_port=args.app_registry_port,
        )
        try:
            reporter.emit(
                "stage",
                stage="superlink",
                message=f"SuperLink ready: sites connect to {service.fleet_address} (Fleet API only; TLS "
                f"{'off' if args.insecure else 'on'}; "
                f"{'node authentication on: register each node.pub' if service.node_auth else 'open enrolment'}); "
                f"Control API on {service.control_address} (this machine only); app registry port "
                f"{service.registry_port}; log: {service.log_path}; Ctrl-C stops it; restart with "
                f"--state-dir {service.log_path.parent} to keep its runs and sites",
                fleet=service.fleet_address,
                control=service.control_address,
            )
            while service.alive():
                time.sleep(0.5)
            raise SegVizError(f"the SuperLink stopped (exit code {service.process.returncode}): {service.log_tail(3)}")
        except KeyboardInterrupt:
            reporter.emit("stage", stage="superlink", message="stopping the SuperLink")
            return 0
        finally:
            service.stop()


def _cmd_join(args: argparse.Namespace) -> int:
    from .site_node import LeftMidRound, join_federation

    reporter = FederationProgress(args.progress)
    with _terminate_as_interrupt():
        try:
            return join_federation(
                args.superlink,
                args.site,
                root_cert=args.root_cert,
                insecure=args.insecure,
                auth_key=args.auth_key,
                connect_timeout=args.connect_timeout,
                reporter=reporter,
                once=args.once,
                device=args.device,
                trust=args.trust,
                share_final_batchnorm=args.share_final_batchnorm,
            )
        except KeyboardInterrupt:
            reporter.emit("stage", stage="leave", message="left the federation")
            return 0
        except LeftMidRound as left:
            reporter.close()
            if args.progress == "json":
                ProgressReporter("json").emit("error", message=str(left))
            print(f"error: {left}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # The warm worker thread may still be inside torch, whose threads abort at interpreter
            # shutdown; the SuperNode is stopped and every file closed, so end here.
            os._exit(2)
        finally:
            reporter.close()


def _cmd_run(args: argparse.Namespace) -> int:
    from .runs import follow_run, start_run

    try:
        settings = _run_settings(args)
    except ValueError as error:
        raise SegVizInputError(None, str(error)) from None
    if args.resume_from is not None:
        if not args.resume_from.is_file():
            raise SegVizInputError(args.resume_from, "round bundle to resume from not found")
        settings.resume_from = str(args.resume_from.resolve())
    run_config = settings.to_run_config()
    run_config.pop("out-dir")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.jsonl"
    offset = progress.stat().st_size if progress.exists() else 0
    reporter = FederationProgress(args.progress, settings.rounds)
    with _terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="segviz-run-") as work:
        try:
            run_id = start_run(
                args.superlink,
                out,
                run_config,
                root_cert=args.root_cert,
                insecure=args.insecure,
                work_dir=work,
                signing_key=args.signing_key,
                registry_port=args.app_registry_port,
            )
            reporter.emit(
                "stage",
                stage="run",
                message=f"run {run_id} started on {args.superlink}; waiting for {args.min_clients} sites",
            )

            def resubmit(bundle: Path | None) -> int:
                resumed = {**run_config, "resume-from": str(bundle) if bundle else run_config["resume-from"]}
                return start_run(
                    args.superlink,
                    out,
                    resumed,
                    root_cert=args.root_cert,
                    insecure=args.insecure,
                    work_dir=work,
                    signing_key=args.signing_key,
                    registry_port=args.app_registry_port,
                )

            path = follow_run(
                out,
                reporter,
                run_id=run_id,
                flwr_home=Path(work) / "flwr-home",
                timeout=args.timeout,
                offset=offset,
                resubmit=resubmit if args.max_resumes > 0 else None,
                superlink_grace=args.superlink_grace,
                max_resumes=args.max_resumes,
                superlink=args.superlink,
            )
        except KeyboardInterrupt:
            reporter.emit(
                "stage",
                stage="run",
                message="stopped following the run (it goes on at the SuperLink; `flwr stop` ends it)",
            )
            return 130
        finally:
            reporter.close()
    if args.progress != "json":
        print(path)
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from .certs import write_certificates

    paths = write_certificates(args.out, hosts=args.host, days=args.days, force=args.force)
    print(
        f"wrote {', '.join(str(p) for p in paths.values())}\n"
        f"coordinator keeps server.key and federation.key (mode 0600): "
        f"segviz federation superlink --tls-dir {args.out}\n"
        f"every site gets {paths['ca.crt']} and {paths['federation-trust.yaml']}: "
        f"segviz federation join --root-cert ca.crt --trust federation-trust.yaml ..."
    )
    return 0


def _cmd_node_key(args: argparse.Namespace) -> int:
    from .certs import write_node_key_pair

    private, public = write_node_key_pair(args.out, force=args.force)
    print(
        f"wrote {private} (keep it on this site) and {public} (send it to the coordinator for `segviz federation register`)"
    )
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .runs import register_node

    node_id = register_node(args.superlink, args.public_key, args.root_cert, name=args.name)
    print(f"registered {args.public_key} as SuperNode {node_id}")
    return 0
