"""Joining Ray, for what runs on it (`outrider compare --backend ray`, env workers with
`task.workers_backend: ray`): Ray is imported only here and only when asked for, and a missing extra is one line
naming `outrider[ray]`."""

from __future__ import annotations

import os
from typing import Any

from outrider.errors import OutriderError


def import_ray(what: str = "--backend ray") -> Any:
    """The `ray` module, or an OutriderError naming WHAT (the option that asked for Ray) and the extra."""
    try:
        import ray
    except ImportError:
        raise OutriderError(f"{what}: Ray is not installed; install the extra: pip install 'outrider[ray]'") \
            from None
    return ray


def connect(address: str | None, cores: int, what: str = "--backend ray") -> tuple[Any, bool]:
    """Join the cluster at ADDRESS (or RAY_ADDRESS), else start a local one with CORES CPUs; returns (ray,
    connected_here): `ray.shutdown()` then stops a local instance, or only disconnects from a cluster, which keeps
    running. Where this process is already connected, that connection is used (and left open)."""
    ray = import_ray(what)
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        kwargs.update(num_cpus=cores, include_dashboard=False)
    ray.init(address=address, **kwargs)
    return ray, True


__all__ = ["connect", "import_ray"]
