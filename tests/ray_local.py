"""A real local Ray cluster for the tests: dashboard off, usage stats off, Serve's proxy on 127.0.0.1 (Ray's own
gRPC ports listen as Ray binds them: see omni/scale/cluster.py), shut down after."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """ray.init through omni's own connect() (what `--ray` without --address does). 4 CPUs declared on a
    2-core machine: Ray Data's read task and two 1-CPU actors deadlock with fewer (see FACTS.md)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    from omni.scale.cluster import connect

    assert not ray.is_initialized(), "another test left Ray running"
    assert connect(None, "127.0.0.1", num_cpus=num_cpus)
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
