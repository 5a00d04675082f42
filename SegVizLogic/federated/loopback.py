"""A whole federation on this machine through Flower's deployment engine, without Ray.

``segviz federation simulate`` and ``segviz experiment`` use Flower's simulation engine when Ray
is installed (``pip install segviz[simulation]``); without it they run the same federation as a
real one on loopback, with the processes a hospital runs (:func:`run_loopback_federation`):

- a SuperLink (:func:`~SegVizLogic.federated.superlink.start_superlink`) and its Fleet gateway on
  127.0.0.1;
- one ``segviz federation join`` process per site (its SuperNode, its warm site worker), on a
  lifeline to this process;
- the run submitted as the signed SegViz app (``flwr run``) and followed until it finishes.

Security on loopback: TLS with a throw-away CA, SuperNode authentication with a throw-away key
per site, and the app signed with a throw-away federation key, all in a temporary folder that
is removed afterwards. Loopback is not private on a shared machine (a hospital's research
server, a GPU box, CI): every local user can reach these ports. Without node authentication
any local process could connect a SuperNode, be sent the global weights, and send back an
update that enters the average; with it only the sites started here can join. It is also the
exact code path of a real federation, so an experiment without Ray tests the product. Bundles
are not signed (the key is thrown away; the simulation engine's bundles are not signed either).
What remains open, as in any SegViz federation: Flower's Control API on 127.0.0.1 accepts any
local caller (docs/SECURITY.md).

Each site trains in its own process, so sites train in parallel (the simulation engine trains
one at a time); each gets ``cpu_count // sites`` torch threads unless ``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import SegVizError
from ..progress import ProgressReporter, parse_progress_line
from .processes import FlowerProcess, flower_environment, free_port
from .task import FederationSettings

__all__ = ["LoopbackFederation", "run_loopback_federation"]


class LoopbackFederation:
    """The coordinator and the sites of a loopback federation, started and stopped together.

    Args:
        site_dirs: site folders (validated by the caller).
        work_dir: keys, certificates, logs (created; the caller removes it).
        device: training device of every site.
        share_final_batchnorm: every site agrees to send its final BatchNorm when asked.
        connect_timeout: seconds for every site to be connected.
        reporter: progress of the start.
    """

    def __init__(
        self,
        site_dirs: Sequence[str | Path],
        work_dir: str | Path,
        device: str = "auto",
        share_final_batchnorm: bool = True,
        connect_timeout: float = 180.0,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.sites = [Path(s).resolve() for s in site_dirs]
        self.work = Path(work_dir)
        self.device = device
        self.share_final_batchnorm = share_final_batchnorm
        self.connect_timeout = connect_timeout
        self.reporter = reporter or ProgressReporter("none")
        self.link = None
        self.joins: list[FlowerProcess] = []
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> LoopbackFederation:  # noqa: PYI034 - typing.Self needs Python 3.11; we support 3.10
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def tls(self) -> Path:
        """The throw-away ``ca.crt``, ``server.*``, ``federation.key`` and trust file."""
        return self.work / "tls"

    def start(self) -> None:
        """Certificates and keys, the SuperLink, every site's key registered, every join connected.

        Raises:
            SegVizError: the SuperLink did not start, or a site did not connect (its join's last line).
        """
        from ..site import load_site
        from .certs import write_certificates, write_node_key_pair
        from .runs import register_node
        from .superlink import start_superlink

        started = time.perf_counter()
        names = [load_site(site).name for site in self.sites]
        self.reporter.emit(
            "stage",
            stage="loopback",
            message=f"Flower deployment engine on 127.0.0.1 (no Ray): a SuperLink and {len(self.sites)} site processes",
        )
        tls = write_certificates(self.tls, force=True)
        self.link = start_superlink(
            f"127.0.0.1:{free_port()}",
            tls_dir=self.tls,
            state_dir=self.work / "superlink",
            control_address=f"127.0.0.1:{free_port()}",
            registry_port=free_port(),
        )
        keys = [write_node_key_pair(self.work / "keys" / name, force=True) for name in names]
        # `flwr supernode register` is one short process per site: register them side by side.
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            list(
                pool.map(
                    lambda pair: register_node(self.link.control_address, pair[1][1], tls["ca.crt"], name=pair[0]),
                    zip(names, keys),
                )
            )
        self.seconds["superlink_and_keys"] = time.perf_counter() - started
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // len(self.sites)))
        for name, site, (private, _) in zip(names, self.sites, keys):
            command = [
                "segviz",
                "federation",
                "join",
                "--superlink",
                self.link.fleet_address,
                "--site",
                str(site),
                "--root-cert",
                str(tls["ca.crt"]),
                "--trust",
                str(tls["federation-trust.yaml"]),
                "--auth-key",
                str(private),
                "--connect-timeout",
                str(int(self.connect_timeout)),
                "--progress",
                "json",
                "--share-final-batchnorm" if self.share_final_batchnorm else "--no-share-final-batchnorm",
            ]
            if self.device != "auto":
                command += ["--device", self.device]
            environment = flower_environment(None, {"OMP_NUM_THREADS": threads})
            # On a lifeline: the joins (and their SuperNodes) end when this process ends, however it ends.
            self.joins.append(
                FlowerProcess(f"site {name}", command, self.work / "joins" / f"{name}.log", environment, lifeline=True)
            )
        self._wait_connected(names)
        self.seconds["start"] = time.perf_counter() - started
        self.reporter.emit(
            "stage",
            stage="loopback",
            message=f"{len(self.sites)} sites connected in {self.seconds['start']:.0f} s",
        )

    def _wait_connected(self, names: Sequence[str]) -> None:
        deadline = time.monotonic() + self.connect_timeout
        waiting = dict(zip(names, self.joins))
        while waiting:
            for name, join in list(waiting.items()):
                events = [e for e in map(parse_progress_line, join.log_text().splitlines()) if e]
                if any(e["event"] == "connected" for e in events):
                    del waiting[name]
                elif not join.alive():
                    errors = [e.get("message", "") for e in events if e["event"] == "error"]
                    raise SegVizError(
                        f"site {name} could not join the loopback federation: "
                        f"{errors[-1] if errors else join.log_tail(3)} (log: {join.log_path})"
                    )
            if waiting and time.monotonic() > deadline:
                raise SegVizError(
                    f"{', '.join(waiting)} did not connect to the loopback SuperLink within "
                    f"{self.connect_timeout:.0f} s (logs in {self.work / 'joins'})"
                )
            time.sleep(0.3)

    def run(self, settings: FederationSettings, out_dir: str | Path, reporter: ProgressReporter) -> Path:
        """Submit ``settings`` as a signed run, relay its progress to ``reporter`` and return the
        final bundle (``out_dir/model.segviz``).

        Raises:
            SegVizError: the run failed (the ServerApp's error, or a site's).
        """
        from .runs import follow_run, start_run

        run_config = settings.to_run_config()
        run_config.pop("out-dir")
        run_config.pop("signing-key")
        run_work = self.work / "run"
        run_id = start_run(
            self.link.control_address,
            out_dir,
            run_config,
            root_cert=self.tls / "ca.crt",
            work_dir=run_work,
            signing_key=self.tls / "federation.key",
            registry_port=self.link.registry_port,
            sign_bundles=False,
        )
        return follow_run(
            out_dir,
            reporter,
            run_id=run_id,
            flwr_home=run_work / "flwr-home",
            superlink=self.link.control_address,
        )

    def stop(self) -> None:
        """End every join (its SuperNode signs off), then the SuperLink (idempotent)."""
        for join in self.joins:
            join.stop()
        self.joins = []
        if self.link is not None:
            self.link.stop()
            self.link = None


def run_loopback_federation(
    settings: FederationSettings,
    site_dirs: Sequence[str | Path],
    reporter: ProgressReporter | None = None,
    device: str = "auto",
    connect_timeout: float = 180.0,
) -> Path:
    """Run ``settings`` over ``site_dirs`` with Flower's deployment engine on loopback (see the
    module docstring) and return the final bundle (``settings.out_dir/model.segviz``).

    Raises:
        SegVizError: a site did not join, or the run failed.
    """
    reporter = reporter or ProgressReporter("none")
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="segviz-loopback-"))
    try:
        with LoopbackFederation(
            site_dirs,
            work,
            device=device,
            share_final_batchnorm=settings.share_final_batchnorm,
            connect_timeout=connect_timeout,
            reporter=reporter,
        ) as federation:
            return federation.run(settings, out_dir, reporter)
    finally:
        shutil.rmtree(work, ignore_errors=True)
