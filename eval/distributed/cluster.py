"""One Ray connection per command: `--ray` alone starts a local Ray (LOCAL_CPUS CPUs) for the command;
`--ray auto` joins the cluster `ray start --head` started on this machine (or RAY_ADDRESS); `--ray
ADDRESS` (host:port or ray://host:10001) joins that cluster. The connection is closed on every exit,
which also stops a local Ray and its worker processes.

Workers import this repository's packages: for a local Ray the driver's checkout is put on the
workers' PYTHONPATH; on a cluster every node needs the same adselect installed (pip install -e .).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from kernel.errors import RuntimeFault
from kernel.settings import REPO_ROOT

log = logging.getLogger(__name__)

LOCAL = "local"  # the `--ray` flag given without an address
LOCAL_CPUS = 2


class RayConnectError(RuntimeFault):
    """Ray could not be started, or the cluster at the given address could not be joined."""

    code = "ray_unavailable"


@contextlib.contextmanager
def ray_session(address: str | None = LOCAL, *, num_cpus: int = LOCAL_CPUS) -> Iterator[dict]:
    """Ray initialised for the body; yields {"address", "local", "cpus"}. Shut down on exit, always."""
    import ray

    local = address in (None, "", LOCAL)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        if local:
            ctx = ray.init(
                num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
                configure_logging=False,
            )  # fmt: skip
        else:
            ctx = ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayConnectError(f"ray at {address if not local else 'a new local instance'}: {e}") from e
    info = {"address": ctx.address_info.get("address") if hasattr(ctx, "address_info") else None, "local": local,
            "cpus": int(ray.cluster_resources().get("CPU", 0)), "ray_version": ray.__version__}  # fmt: skip
    log.info("ray connected", extra=info)
    try:
        yield info
    finally:
        ray.shutdown()
