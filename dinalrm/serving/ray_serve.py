"""`dinalrm-serve --ray`: the same FastAPI app deployed with Ray Serve, one replica per GPU.

Each replica builds the app of `dinalrm.serving.server.create_app` (model loading and micro-batching included) when it
starts, so a verl / verl-omni cluster, itself on Ray, can host the reward model on its own GPUs or nodes; Ray Serve
spreads the requests over the replicas. Needs the `serve` extra: `pip install "dinalrm[serve]"`.
"""

from __future__ import annotations

import os
import time

import torch

from .server import ServeOptions, create_app


def build_deployment(options: ServeOptions, num_replicas: int = 1, num_gpus_per_replica: float | None = None):
    """The Ray Serve application (`Deployment.bind()`) serving `create_app(options)` on `num_replicas` replicas.

    Args:
        options ([`ServeOptions`]): what every replica loads and how it batches.
        num_replicas (`int`): replicas (each loads its own copy of the model).
        num_gpus_per_replica (`float`, *optional*): GPUs per replica; defaults to 1 when CUDA is available, else 0.
    """
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError('dinalrm-serve --ray needs Ray Serve: pip install "dinalrm[serve]".') from error
    if num_gpus_per_replica is None:
        num_gpus_per_replica = 1 if torch.cuda.is_available() else 0

    def build_app():
        """Runs on each replica when it starts: the model loads there, never in the driver."""
        return create_app(options, background_load=False)

    @serve.deployment(
        name="DiNaLRMServer",
        num_replicas=num_replicas,
        ray_actor_options={"num_gpus": num_gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=max(options.max_queue, 1),
    )
    @serve.ingress(build_app)
    class DiNaLRMServer:
        """One replica: the app's lifespan loads the model and starts its batcher."""

    return DiNaLRMServer.bind()


def run_ray(
    options: ServeOptions, host: str, port: int, num_replicas: int, num_gpus_per_replica: float | None = None
) -> None:
    """Starts Ray (or joins the running cluster), deploys the app on `host:port` and serves until interrupted."""
    import ray
    from ray import serve

    ray.init(address="auto" if _cluster_running() else None, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_deployment(options, num_replicas, num_gpus_per_replica), name="dinalrm", route_prefix="/")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


def _cluster_running() -> bool:
    """Whether this machine belongs to a running Ray cluster (then replicas go to its GPUs or nodes)."""
    return bool(os.environ.get("RAY_ADDRESS")) or os.path.exists("/tmp/ray/ray_current_cluster")
