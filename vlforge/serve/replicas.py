"""`serve.replicas=N` (or `serve.address=`): the same FastAPI app as the ingress of a Ray Serve
deployment of N replicas, each loading the model itself on its own device (one GPU per replica where
the cluster has GPUs, CPU replicas otherwise), Ray's proxy balancing requests among them.

Ray is an optional dependency (`pip install "vlforge[ray]"`), imported only here and only when
replicas are asked for. Without `serve.address` (or with `serve.address=local`), `vlforge serve` starts
a Ray of its own and stops it on exit; with a cluster's address it deploys onto that cluster and, on
exit, deletes only its own application."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vlforge.config.serve import ServeConfig
from vlforge.core.errors import ConfigError
from vlforge.serve.auth import load_api_keys
from vlforge.serve.replica_loss import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from vlforge.serve.server import ServeRequest, build_app, served_recipe

APP_NAME = "vlforge"
log = logging.getLogger("vlforge.serve")


class ModelReplica:
    """One replica: builds the app for `request` in its own process (Ray calls
    `__serve_build_asgi_app__` after the constructor) and reports its health to Ray. `api_keys` are
    the driver's: a replica on another node has neither its environment nor its files."""

    def __init__(self, request: ServeRequest, api_keys: tuple[bytes, ...] = ()) -> None:
        self.request, self.api_keys = request, api_keys
        self.served: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        from ray import serve

        self.served, _ = build_app(self.request, api_keys=self.api_keys)
        self.served.state.server.replica = serve.get_replica_context().replica_id.unique_id
        return self.served

    def check_health(self) -> None:
        """Ray replaces a replica whose model worker has died."""
        if self.served is not None and not self.served.state.server.scheduler.alive:
            raise RuntimeError("the model worker of this replica has stopped")


def portable_request(request: ServeRequest) -> ServeRequest:
    """`request` with a local checkpoint path made absolute: replicas do not share the driver's
    working directory (on a cluster, a shared filesystem is still needed)."""
    checkpoint = request.checkpoint
    if checkpoint is not None and Path(checkpoint).expanduser().exists():
        checkpoint = str(Path(checkpoint).expanduser().resolve())
    return ServeRequest(request.model, request.recipe, checkpoint, list(request.overrides))


def deployment_options(config: ServeConfig, cluster_gpus: float) -> dict[str, Any]:
    """Ray Serve deployment options from the serve config. A replica takes as many requests as its own
    queue holds (its scheduler answers 503 beyond that), so Ray's routing never caps the batch."""
    gpus = config.gpus_per_replica
    if config.device_map is not None and gpus is None:
        raise ConfigError("serve.device_map with Ray Serve replicas: set serve.gpus_per_replica to the number of GPUs "
                          "each replica spreads its language model over")
    if gpus is None:
        gpus = 1.0 if config.device != "cpu" and cluster_gpus >= 1 else 0.0
    per_replica = config.batching.max_running + config.batching.max_queue
    return {"name": APP_NAME, "num_replicas": config.replicas,
            "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": gpus},
            "max_ongoing_requests": per_replica, "max_queued_requests": config.batching.max_queue,
            "graceful_shutdown_timeout_s": config.graceful_shutdown_s, "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 5.0}


class _Stop:
    """The first Ctrl-C / SIGTERM stops the command (a drain, or the start given up); a second one
    stops at once (KeyboardInterrupt, through the cleanup)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        log.info("vlforge serve: %s, draining in-flight requests (again to stop at once)", signal.Signals(signum).name)
        self.event.set()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def serve_replicas(request: ServeRequest, config: ServeConfig) -> None:
    """Deploy, wait for Ctrl-C / SIGTERM, then drain: Ray lets each replica finish its in-flight
    requests (serve.graceful_shutdown_s) before the app, and then the Ray this started, go away."""
    # What the driver can refuse before Ray starts.
    served_recipe(request, config)
    deployment_options(config, cluster_gpus=0.0)
    api_keys = load_api_keys(config)
    try:
        import ray
        from ray import serve
        from ray.exceptions import RayError
    except ImportError:
        raise ConfigError(f"serve.replicas={config.replicas}: replicas run on Ray Serve; "
                          'pip install "vlforge[ray]"') from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # Ray gives a new proxy 5 s to report ready, three times, before it replaces it; a loaded machine
    # can miss that and replace proxies in a loop.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    local = config.address in (None, "local")
    try:
        ray.init(address="local" if local else config.address, include_dashboard=False, configure_logging=False)
    except (ConnectionError, RayError) as err:
        raise ConfigError(f"serve.address={config.address}: cannot start or join Ray ({_first_line(err)}); a cluster "
                          "with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                          "~/.ray/auth_token)") from None
    stop = _Stop()  # after ray.init, which installs handlers of its own
    deployed = False
    try:
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
        except (RayError, RuntimeError) as err:
            raise ConfigError(f"serve.host={config.host} serve.port={config.port}: Ray Serve's proxy could not start "
                              f"({_first_line(err)}); is the port in use?") from None
        options = deployment_options(config, ray.cluster_resources().get("GPU", 0.0))
        app = serve.deployment(serve.ingress()(ModelReplica), **options).bind(portable_request(request), api_keys)
        serve.run_many([serve.RunTarget(app, name=APP_NAME, route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        deployed = True
        _wait_until_running(serve, stop.event)
        if not stop.event.is_set():
            log.info("vlforge serve: %d replica(s) ready on http://%s:%d", config.replicas, config.host, config.port)
        while not stop.event.wait(0.5):
            pass
    finally:
        _shut_down(serve, ray, deployed, local)


def _wait_until_running(serve: Any, stop: threading.Event) -> None:
    """Until the application runs (or a signal asks to stop); ConfigError if it cannot deploy."""
    while not stop.wait(0.5):
        application = serve.status().applications.get(APP_NAME)
        status = getattr(getattr(application, "status", None), "value", None)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise ConfigError(f"the replicas could not start: {_first_line(RuntimeError(application.message))} "
                              "(the replica's error is in the log above)")


def _shut_down(serve: Any, ray: Any, deployed: bool, local: bool) -> None:
    """Deleting the application first drains it: Ray routes nothing new to its replicas and lets each
    finish what it holds while the proxies still carry the answers back. Then the Ray this started."""
    try:
        if deployed:
            serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    except Exception:  # the cleanup must not hide why the command stopped, nor skip ray.shutdown
        log.exception("vlforge serve: while deleting the deployment")
    finally:
        if local:
            ray.shutdown()
