"""Joining or starting the Ray cluster that `omni serve --ray` and `omni caption --ray` run on."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

log = logging.getLogger("omni.ray")

NAMESPACE = "omni"  # our own actors (the replicas' status board); Serve's live in its own namespace


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def require_ray():
    """Import ray, or say how to get it."""
    from omni.cli import UserError

    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]' (ray[serve,data]==2.60.0)") from None
    return ray


def connect(address: str | None, host: str = "127.0.0.1", num_cpus: int | None = None) -> bool:
    """ray.init: join `address` ("auto", "HOST:6379", "ray://...") or start a local Ray on this machine
    (dashboard off, no usage statistics, token authentication on as Ray 2.60 has it by default). Returns
    whether a local Ray was started here (the caller shuts it down). num_cpus: the CPUs a local Ray declares
    (a scheduling budget: default this machine's count).

    What listens where: Serve's HTTP proxy binds `--host` (deploy's http_options). Ray's own ports do not
    follow it: this wheel's GCS, raylet and worker gRPC servers listen on every interface (measured with
    `ss -ltnp`), and ray.init turns a node address of 127.0.0.1 into the machine's routable one
    (services.resolve_ip_for_localhost); the token is what guards them. A `--host` that names one of this
    machine's addresses is passed on as the node's address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require_ray()
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, namespace=NAMESPACE, **quiet)
        return False
    node_ip = None if is_loopback(host) or host in ("0.0.0.0", "::") else host
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE,
             **({"_node_ip_address": node_ip} if node_ip else {}), **quiet)
    return True


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def thread_env(threads: int) -> dict:
    """The process environment of a replica or worker with `threads` CPU threads: OpenMP reads it when torch
    loads, and torch.set_num_threads in the constructor does not reach the engine's own worker thread
    (measured: a replica with set_num_threads(1) alone used 1.75 cores of 2)."""
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
