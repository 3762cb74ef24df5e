"""Connecting to Ray: an existing cluster by address, or a local Ray started for one run.

Example:
    >>> from dn2.ray import ray_session
    >>> with ray_session(num_cpus=2):        # a local Ray, shut down at the end   # doctest: +SKIP
    ...     pass
    >>> with ray_session("auto"):            # the cluster this machine belongs to  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import ray

__all__ = ["ray_session"]


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                temp_dir: str | None = None) -> Iterator[None]:
    """Use the Ray session already open in this process, or open one for the ``with`` block.

    ``address`` None starts a local Ray with ``num_cpus`` CPUs (default: all of this machine) and
    no dashboard, shut down at the end; ``"auto"`` joins the cluster this machine belongs to (after
    ``ray start --head``), ``"ray://host:10001"`` connects through Ray Client. A session opened
    elsewhere (a notebook, a test fixture) is used as it is and left open.
    """
    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
                 logging_level=logging.WARNING, log_to_driver=False)
    else:
        if num_cpus is not None:
            raise ValueError("num_cpus applies to a local Ray only; a cluster's CPUs are set by `ray start`")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
