"""Many loraserve replicas behind one endpoint, with adapter-aware routing, on Ray Serve.

Optional: ``pip install 'loraserve[ray]'``; nothing else in loraserve imports this module. Started by
``loraserve ray-serve --num-replicas N [serve flags]`` (:func:`main`) or from Python with
:func:`build_app` and ``serve.run``.

Three parts, all on Ray (one module each):

- :class:`AdapterCatalog`, one named actor: the fleet's adapters (name -> source and a version that
  every load and unload bumps) and the last statistics each replica reported. The ingress writes it
  (``/load_lora_adapter``, ``/unload_lora_adapter``); replicas read it.
- ``LoraserveReplica`` (``--num-replicas`` of them): an in-process :class:`~loraserve.engine.Engine`
  and loraserve's own FastAPI app over it, called through ASGI, so every route, validation and error
  is the single server's. Adapters are Ray Serve *multiplexed models*: the adapter name is the model
  id, ``@serve.multiplexed`` keeps up to ``--max-adapters-per-replica`` of them per replica (LRU; an
  evicted one is unloaded from the engine), and Ray's router sends a request to a replica that
  already holds its adapter when one exists (else to the least loaded, which then loads it). Before
  each request a replica checks its adapters against the catalog (unloaded: dropped; reloaded with
  another version: loaded again); its health check, every second, drops unloaded adapters even
  when no request arrives, and reports its statistics.
- ``LoraserveIngress``: the HTTP entry point. It reads the adapter names a request uses (OpenAI
  ``model``, native ``lora_path``) and forwards the request, body untouched, to a replica through a
  handle with ``multiplexed_model_id``; answers stream back chunk by chunk. It serves
  ``/v1/models`` (base model and every catalogued adapter, with the replicas holding it),
  ``/metrics`` (fleet and per-replica counters) and the adapter load/unload routes itself. A replica
  that dies mid-request gives its client a 503 (or, mid-stream, an error event), never a hang; Ray
  starts a new replica in its place.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import ray
from ray import serve

from loraserve.ray_serve.catalog import CATALOG, NAMESPACE, AdapterCatalog, catalog_handle
from loraserve.ray_serve.ingress import LoraserveIngress, fleet_metrics, request_adapters
from loraserve.ray_serve.replica import ReplicaBase, replica_deployment
from loraserve.settings import Settings

__all__ = [
    "CATALOG",
    "NAMESPACE",
    "AdapterCatalog",
    "LoraserveIngress",
    "ReplicaBase",
    "build_app",
    "catalog_handle",
    "fleet_metrics",
    "main",
    "replica_deployment",
    "request_adapters",
    "shutdown_fleet",
]


def build_app(
    settings: Settings, num_replicas: int, max_adapters_per_replica: int = 64, replica_cpus: float | None = None
):
    """The Ray Serve application (``serve.run`` it) for ``settings`` (each replica's engine;
    ``--lora-paths`` seed the catalog). Creates the catalog actor (detached, in namespace
    ``loraserve``) if it does not exist; ray must be initialised."""
    adapters = {spec.lora_name: spec.lora_path for spec in settings.lora_paths or []}
    AdapterCatalog.options(name=CATALOG, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote(adapters)
    data = settings.model_dump(mode="json")
    data["engine_in_process"] = True  # the replica is the process
    gpus = settings.tp_size if settings.device != "cpu" else 0
    options = {"num_gpus": gpus, "num_cpus": 1 if replica_cpus is None else replica_cpus}
    replica = replica_deployment(max_adapters_per_replica, num_replicas, options).bind(data)
    return LoraserveIngress.bind(replica, settings.max_request_body_bytes)


def shutdown_fleet() -> None:
    """Stop the Serve application and the catalog (ray stays initialised)."""
    serve.shutdown()
    try:
        ray.kill(catalog_handle())
    except ValueError:
        pass


def main(argv: Sequence[str]) -> int:
    """``loraserve ray-serve``: the fleet on the local machine or on ``--ray-address``."""
    from loraserve.cli import _plugin_manager, configure_logging, parse_settings

    parser = argparse.ArgumentParser(
        prog="loraserve ray-serve",
        add_help=False,
        allow_abbrev=False,
        description="Serve N replicas behind one endpoint with adapter-aware routing on Ray Serve. Every other "
        "flag is 'loraserve serve's (see 'loraserve --help') and configures each replica's engine.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--num-replicas", type=int, default=2, help="engine replicas (default 2)")
    parser.add_argument(
        "--max-adapters-per-replica", type=int, default=64, help="adapters Ray's multiplexing keeps per replica (LRU)"
    )
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start Ray here)")
    parser.add_argument("--replica-cpus", type=float, default=None, help="CPUs Ray reserves per replica (default 1)")
    own, rest = parser.parse_known_args(list(argv))
    if own.help:
        parser.print_help()
        return 0
    if own.num_replicas < 1 or own.max_adapters_per_replica < 1:
        print("loraserve ray-serve: --num-replicas and --max-adapters-per-replica must be at least 1", file=sys.stderr)
        return 2
    settings = parse_settings(rest, _plugin_manager(rest))
    configure_logging(settings.log_level)
    ray.init(address=own.ray_address, namespace=NAMESPACE, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_app(settings, own.num_replicas, own.max_adapters_per_replica, own.replica_cpus)
    try:
        serve.run(app, name="loraserve", route_prefix="/", blocking=False)
        print(
            f"loraserve: {own.num_replicas} replicas of {settings.model_path} at "
            f"http://{settings.host}:{settings.port} (OpenAI API: /v1); Ctrl+C to stop",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown_fleet()
