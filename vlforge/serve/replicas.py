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
from typing import Any

from fastapi import FastAPI

from vlforge.config.serve import ServeConfig
from vlforge.core.errors import ConfigError
from vlforge.serve.replica_loss import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from vlforge.serve.server import ServeRequest, build_app, served_recipe

APP_NAME = "vlforge"
log = logging.getLogger("vlforge.serve")


class ModelReplica:
    """One replica: builds the app for `request` in its own process (Ray calls
    `__serve_build_asgi_app__` after the constructor) and reports its health to Ray."""

    def __init__(self, request: ServeRequest) -> None:
        self.request = request
        self.served: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        from ray import serve

        self.served, _ = build_app(self.request)
        self.served.state.server.replica = serve.get_replica_context().replica_id.unique_id
        return self.served

    def check_health(self) -> None:
        """Ray replaces a replica whose model worker has died."""
        if self.served is not None and not self.served.state.server.scheduler.alive:
            raise RuntimeError("the model worker of this replica has stopped")


def deployment_options(config: ServeConfig, cluster_gpus: float) -> dict[str, Any]:
    """Ray Serve deployment options from the serve config. A replica takes as many requests as its own
    queue holds (its scheduler answers 503 beyond that), so Ray's routing never caps the batch."""
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if config.device != "cpu" and cluster_gpus >= 1 else 0.0
    per_replica = config.batching.max_running + config.batching.max_queue
    return {"name": APP_NAME, "num_replicas": config.replicas,
            "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": gpus},
            "max_ongoing_requests": per_replica, "max_queued_requests": config.batching.max_queue,
            "graceful_shutdown_timeout_s": config.graceful_shutdown_s, "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 5.0}


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.info("vlforge serve: %s, draining in-flight requests", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def serve_replicas(request: ServeRequest, config: ServeConfig) -> None:
    """Deploy, wait for Ctrl-C / SIGTERM, then drain: Ray lets each replica finish its in-flight
    requests (serve.graceful_shutdown_s) before the app, and then the Ray this started, go away."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError(f"serve.replicas={config.replicas}: replicas run on Ray Serve; "
                          'pip install "vlforge[ray]"') from None
    served_recipe(request, config)  # what the driver can refuse before Ray starts
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    local = config.address in (None, "local")
    try:
        ray.init(address="local" if local else config.address, include_dashboard=False, configure_logging=False)
    except ConnectionError as err:
        raise ConfigError(f"serve.address={config.address}: cannot join the Ray cluster ({str(err).splitlines()[0]}); "
                          "a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
                          "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)") from None
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        options = deployment_options(config, ray.cluster_resources().get("GPU", 0.0))
        app = serve.deployment(serve.ingress()(ModelReplica), **options).bind(request)
        stop = _stop_event()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as err:
            raise ConfigError(f"the replicas could not start: {err}") from None
        log.info("vlforge serve: %d replica(s) ready on http://%s:%d", config.replicas, config.host, config.port)
        while not stop.wait(0.5):
            pass
    finally:
        # Deleting the application first drains it: Ray routes nothing new to its replicas and lets
        # each finish what it holds while the proxies still carry the answers back.
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
            ray.shutdown()
