"""A whole federation on one machine: Flower's simulation engine (Ray) or its deployment engine.

:func:`run_federated_simulation` is the one entry point (``segviz federation simulate``,
``segviz experiment``, the demo); ``engine`` chooses how the federation runs:

- ``"simulation"``: Flower's simulation engine, whose only backend in Flower 1.42 is Ray
  (``pip install segviz[simulation]``): one process, virtual sites trained one at a time;
- ``"deployment"``: Flower's deployment engine on loopback
  (:func:`~SegVizLogic.federated.loopback.run_loopback_federation`): a SuperLink and one
  ``segviz federation join`` process per site, as in a real federation; needs no Ray;
- ``"auto"`` (default): the simulation engine when Ray imports, else the deployment engine.

Both run the same ServerApp and ClientApp code with the same settings, so they train the same
model up to floating-point summation order and thread counts (measured in
Testing/federated/test_federated_engines.py).

``flwr.simulation.run_simulation`` runs the same ServerApp/ClientApp logic as a real
federation, but hands the ServerApp an empty run config and gives each virtual SuperNode only
``partition-id``. So in the simulation engine configuration travels like this:

- the ServerApp is built by :func:`~SegVizLogic.federated.server_app.make_server_app` with the
  :class:`~SegVizLogic.federated.task.FederationSettings` bound in Python;
- the server sends everything a site needs (epochs, lr, strategy, network, training and
  preprocessing settings, lineage) in each train message's ``config`` record, exactly as in
  deployment;
- the ClientApp built by :func:`~SegVizLogic.federated.client_app.make_client_app` maps
  ``partition-id`` *i* to the *i*-th site folder.

The deployment engine reads the same settings from the run config (``flwr run --run-config``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import SegVizError, SegVizInputError
from ..network import NetworkConfig
from ..preprocessing import Preprocessing
from ..progress import ProgressReporter
from .task import FederationSettings

__all__ = [
    "ENGINES",
    "choose_engine",
    "quiet_simulation_notices",
    "run_federated_simulation",
    "simulation_available",
]

ENGINES = ("auto", "simulation", "deployment")


class _SimulationNotices(logging.Filter):
    """Drops two Flower log records that every simulation prints and no user can act on.

    - "The `run_simulation` function is deprecated ... use `flwr run`": ``flwr run`` runs the
      apps from a packaged app with only its run config, but the simulation engine binds its
      settings, its progress reporter and the tests' ``on_round``/``client_mods`` hooks in Python
      (see the module docstring). The ``flwr run`` path is the deployment engine
      (:mod:`~SegVizLogic.federated.loopback`); here the warning is silenced, and only this one.
    - "Manually terminating ClientAppActor": how Flower ends every Ray actor at the end of a run.
    """

    NOTICES = ("The `run_simulation` function is deprecated", "Manually terminating")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


_SIMULATION_NOTICES = _SimulationNotices()


def quiet_simulation_notices(message, context, call_next):
    """Flower client mod: the :class:`_SimulationNotices` filter in the Ray actor that runs the
    ClientApp (the actor ends with a notice of its own); otherwise passes the message on."""
    flwr_logger = logging.getLogger("flwr")
    if _SIMULATION_NOTICES not in flwr_logger.filters:
        flwr_logger.addFilter(_SIMULATION_NOTICES)
    return call_next(message, context)


@functools.lru_cache(maxsize=1)
def simulation_available() -> bool:
    """Whether Flower's simulation engine can run here: Ray is installed and imports."""
    if importlib.util.find_spec("ray") is None:
        return False
    try:
        import ray  # noqa: F401 - a broken or shadowed Ray must not be chosen
    except ImportError:
        return False
    return True


def choose_engine(engine: str = "auto") -> str:
    """``"simulation"`` or ``"deployment"`` for ``engine`` (``auto``: simulation when Ray imports).

    Raises:
        SegVizInputError: an unknown engine, or ``simulation`` without Ray.
    """
    if engine not in ENGINES:
        raise SegVizInputError(None, f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "simulation" if simulation_available() else "deployment"
    if engine == "simulation" and not simulation_available():
        raise SegVizInputError(
            None,
            "the simulation engine needs Ray: pip install 'segviz[simulation]', or run with --engine deployment",
        )
    return engine


def run_federated_simulation(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    rounds: int = 3,
    local_epochs: int = 2,
    strategy: str = "fedbn",
    weighting: str = "uniform",
    lr: float = 1e-3,
    head_aggregation: str = "annotating",
    preprocessing: Preprocessing | None = None,
    training_config=None,
    reporter: ProgressReporter | None = None,
    seed: int = 0,
    network_config: NetworkConfig | None = None,
    share_final_batchnorm: bool = True,
    default_batchnorm: str = "auto",
    device: str = "auto",
    client_mods: Sequence[Callable] = (),
    on_round: Callable | None = None,
    num_cpus: int | None = None,
    min_clients: int | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_clipping_norm: float = 0.0,
    resume_from: str | Path = "",
    engine: str = "auto",
    fraction_train: float = 1.0,
    min_train_nodes: int = 0,
    round_deadline: float = 0.0,
    transfer_dtype: str = "float32",
    sites_at_once: int = 1,
    choose_threshold: bool = True,
) -> Path:
    """Train one global model over ``site_dirs`` on this machine (see the module docstring).

    Args:
        site_dirs: site folders (one virtual SuperNode each).
        out_dir: receives ``round-NNN.segviz``, ``model.segviz``.
        rounds: federated rounds.
        local_epochs: local epochs per round.
        strategy: ``"fedbn"`` or ``"fedavg"``.
        weighting: ``"examples"`` or ``"uniform"``.
        lr: local learning rate.
        head_aggregation: ``"evidence"`` or ``"annotating"`` (see :class:`FederationSettings`).
        preprocessing: preprocessing (default: the paper's).
        training_config: a ``TrainingConfig`` (default: the paper's).
        reporter: progress events (round_started, update_sent, round_finished, run_finished).
        seed: seeds the initial model and the sites' sampling.
        network_config: the network (default: the paper's).
        share_final_batchnorm: see :class:`FederationSettings`.
        default_batchnorm: the bundle's default BatchNorm (``auto``: see :class:`FederationSettings`).
        device: training device of the sites.
        client_mods: Flower client mods (tests record what leaves each site with one);
            simulation engine only.
        on_round: ``(round, replies, global partition)`` after each aggregation; simulation
            engine only (the deployment engine's ServerApp is another process).
        num_cpus: CPUs given to the simulation engine (default: all).
        min_clients: usable replies a round needs (default: every site).
        dp_noise_multiplier: differential privacy's noise multiplier (0: off; see
            :mod:`~SegVizLogic.federated.privacy`).
        dp_clipping_norm: differential privacy's clipping norm (0: off).
        resume_from: a bundle to continue from (its weights and lineage; under FedBN a site
            without BatchNorm of that lineage starts from the bundle's averaged BatchNorm).
        engine: ``"auto"``, ``"simulation"`` or ``"deployment"`` (:func:`choose_engine`).
        fraction_train, min_train_nodes, round_deadline, transfer_dtype, choose_threshold: see
            :class:`~SegVizLogic.federated.task.FederationSettings`.
        sites_at_once: virtual sites the simulation engine trains at the same time (default 1:
            one at a time with every CPU, fastest for torch on a small machine; more lets a
            round's replies arrive out of order, as in a real federation). The deployment
            engine always trains every site in its own process.

    Returns:
        The final bundle's path (``out_dir/model.segviz``).

    Raises:
        SegVizInputError: a site folder is not usable (checked before anything starts), an
            unknown engine, or the simulation engine without Ray.
        SegVizError: the federation failed.
    """
    from ..training import TrainingConfig, load_site_data

    engine = choose_engine(engine)
    if engine == "deployment" and (client_mods or on_round is not None):
        raise SegVizInputError(None, "client mods and on_round hooks need the simulation engine (Ray)")
    if len(site_dirs) < 1:
        raise SegVizInputError(None, "give at least one --site")
    if sites_at_once < 1:
        raise SegVizInputError(None, f"sites_at_once must be >= 1, got {sites_at_once}")
    reporter = reporter or ProgressReporter("none")
    preprocessing = preprocessing or Preprocessing()
    training_config = training_config or TrainingConfig()
    try:
        settings = FederationSettings(
            rounds=rounds,
            local_epochs=local_epochs,
            lr=lr,
            strategy=strategy,
            weighting=weighting,
            head_aggregation=head_aggregation,
            min_clients=min_clients or len(site_dirs),
            out_dir=str(Path(out_dir).resolve()),
            share_final_batchnorm=share_final_batchnorm,
            default_batchnorm=default_batchnorm,
            seed=seed,
            network=network_config or NetworkConfig(),
            training=training_config.to_dict(),
            preprocessing=preprocessing,
            wait_timeout=120,
            dp_noise_multiplier=dp_noise_multiplier,
            dp_clipping_norm=dp_clipping_norm,
            resume_from=str(resume_from),
            fraction_train=fraction_train,
            min_train_nodes=min_train_nodes,
            round_deadline=round_deadline,
            transfer_dtype=transfer_dtype,
            choose_threshold=choose_threshold,
        )
    except ValueError as error:
        raise SegVizInputError(None, str(error)) from None
    # Validate and preprocess every site here, once: a bad folder fails before Ray starts,
    # and the virtual clients then read the cache.
    names = set()
    for site_dir in site_dirs:
        data = load_site_data(site_dir, preprocessing, training_config, reporter=reporter)
        if data.name in names:
            raise SegVizInputError(site_dir, f"two sites are called {data.name!r}; site names must be unique")
        names.add(data.name)
    if engine == "deployment":
        from .loopback import run_loopback_federation

        return run_loopback_federation(settings, site_dirs, reporter, device=device)
    return _run_simulation_engine(settings, site_dirs, reporter, device, client_mods, on_round, num_cpus, sites_at_once)


def _run_simulation_engine(
    settings: FederationSettings,
    site_dirs: Sequence[str | Path],
    reporter: ProgressReporter,
    device: str,
    client_mods: Sequence[Callable],
    on_round: Callable | None,
    num_cpus: int | None,
    sites_at_once: int = 1,
) -> Path:
    """The federation in Flower's simulation engine (Ray); returns the final bundle."""
    from flwr.simulation import run_simulation

    from .client_app import make_client_app
    from .server_app import make_server_app

    result: dict = {}
    server = make_server_app(settings, reporter, on_round=on_round, result=result)
    client = make_client_app(site_dirs, mods=[quiet_simulation_notices, *client_mods], device=device)
    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        # One virtual client at a time gets all CPUs: torch is faster with threads than with
        # several clients competing on a small machine. Ray runs init CPUs // client CPUs actors
        # at once, so `sites_at_once` declares that many times the CPUs (Ray's CPUs are logical).
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus * sites_at_once,
            "num_gpus": 0,
            "logging_level": "ERROR",
            "log_to_driver": True,
        },
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if reporter.mode != "rich":
        flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(_SIMULATION_NOTICES)
    import ray

    started_ray = not ray.is_initialized()
    try:
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=len(site_dirs),
            backend_name="ray",
            backend_config=backend_config,
        )
    except SegVizError:
        raise
    except Exception as error:
        cause = error.__cause__ or error
        raise SegVizError(f"federated simulation failed: {cause}") from error
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(_SIMULATION_NOTICES)
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if "model" not in result:
        raise SegVizError("federated simulation ended without a model (see the log above)")
    return Path(result["model"])
