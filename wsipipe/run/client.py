"""Clients of a Dask scheduler (``dask.scheduler_address``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from wsipipe.config import DaskConfig
from wsipipe.errors import ConfigError


@contextlib.contextmanager
def connect(address: str, timeout: str = "20s") -> Iterator:
    """A client of the scheduler at ``address``; a scheduler that can't be reached is a ConfigError."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(None, f"dask.scheduler_address={address!r}: cannot reach the scheduler ({exc})") from None
    with client:
        yield client


@contextlib.contextmanager
def scheduler_client(cfg: DaskConfig) -> Iterator:
    """A client of ``dask.scheduler_address`` for the block, or None when none is configured
    (the tiler then runs its chunk tasks on threads in this process)."""
    if not cfg.scheduler_address:
        yield None
        return
    with connect(cfg.scheduler_address) as client:
        yield client
