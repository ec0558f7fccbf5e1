"""Running a Ray Data pipeline: connecting to Ray, the context every job sets, and the stall guard.

Shared by ``segment`` and ``evaluate``: one place decides how a job connects,
which Ray Data settings it uses (no per-operator progress bars, a stall timeout)
and how a run that makes no progress fails (:class:`Stalled`, with the reason).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any


class Stalled(RuntimeError):
    """A Ray Data run made no progress for its timeout (stuck stage, or pools the cluster cannot place)."""


#: Loggers of Ray's that speak on the console during a run; quiet unless ``verbose`` (their files keep everything).
RAY_CONSOLE_LOGGERS: tuple[str, ...] = ("ray", "ray.data", "ray.data._internal.progress")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (a cluster, ``auto``; else ``RAY_ADDRESS``) or start a new local Ray; quiet on the console.

    Without an address the job starts its own local instance (``address="local"``): Ray's own
    default would join whatever cluster ``/tmp/ray`` last recorded, and a stale record makes it
    retry a dead address for minutes. ``num_cpus`` sizes a local instance only (Ray refuses it
    when connecting to a cluster).

    The console shows the job's progress bar, its summary and real problems: Ray's INFO and
    WARNING lines (token authentication, "progress bars disabled", memory advice) go to Ray's
    log files only (the jobs' command line also sets aside the driver's native C++ lines:
    ``jobs/console.py``). ``verbose`` (``--verbose``) or ``RAY_LOG_LEVEL`` shows them again.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    level = os.environ.get("RAY_LOG_LEVEL") or ("INFO" if verbose else "ERROR")
    kwargs: dict[str, Any] = {"logging_level": level, "log_to_driver": verbose}
    if address == "local":
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    import ray.data  # its import configures its loggers (INFO): set the levels after it

    for name in RAY_CONSOLE_LOGGERS:
        logging.getLogger(name).setLevel(level)


#: CPUs of the hash-join and group-by workers: small, so they fit beside the actor pools on any node.
SHUFFLE_ACTOR_CPUS = 0.25
#: Ray Data's largest block: small blocks keep every task's memory (a shuffle's map side, a reader
#: of a big manifest) bounded whatever the input's size. A single larger row still makes one block.
MAX_BLOCK_BYTES = 16 * 1024**2
#: Input bytes per shuffle-map task of a join or group-by.
SHUFFLE_INPUT_BYTES = 64 * 1024**2


def configure_context(*, no_progress_timeout_s: float) -> None:
    """Ray Data settings of a job: no per-operator bars (the job shows one), the stall timeout (0 = none),
    shuffle workers that fit beside the actor pools."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.target_max_block_size = MAX_BLOCK_BYTES
    if hasattr(ctx, "shuffle_input_batch_bytes"):
        # A join's shuffle-map task takes this many input bytes at once (Ray's default: 1 GiB,
        # measured at 1.9 GB private memory in one task at 10M prior rows).
        ctx.shuffle_input_batch_bytes = SHUFFLE_INPUT_BYTES
    for name in ("join_operator_actor_num_cpus_override", "hash_shuffle_operator_actor_num_cpus_override",
                 "hash_aggregate_operator_actor_num_cpus_override"):
        if hasattr(ctx, name):
            setattr(ctx, name, SHUFFLE_ACTOR_CPUS)
    ctx.enable_operator_progress_bars = False
    # Ray's default (no wait for an actor pool's minimum): a run on a cluster that can grow sets its own
    # (wait_for_min_actors) after planning; the context is process-wide, so each job starts from the default.
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    ctx.wait_for_min_actors_s = DEFAULT_WAIT_FOR_MIN_ACTORS_S
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s if no_progress_timeout_s > 0 else -1


def wait_for_min_actors(seconds: float) -> None:
    """``seconds`` > 0: an actor pool's start waits up to this long for its minimum actors (nodes an autoscaler
    adds), then the run fails with Ray's "Timed out while starting actors"; 0: Ray's default (no wait)."""
    from ray.data import DataContext
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    DataContext.get_current().wait_for_min_actors_s = seconds if seconds > 0 else DEFAULT_WAIT_FOR_MIN_ACTORS_S


def stall_guarded(
    batches: Iterable[Any], *, timeout_s: float, what: str = "the run", setting: str = ""
) -> Iterator[Any]:
    """Iterate ``batches`` of a Ray dataset; a stall becomes :class:`Stalled` with a one-line reason.

    ``setting``: the name of the option that set ``timeout_s`` (named in the message).
    """
    from ray.data.exceptions import ExecutionTimeoutError

    try:
        yield from batches
    except ExecutionTimeoutError as exc:
        limit = f"{setting} = {timeout_s:g} s" if setting else f"{timeout_s:g} s"
        raise Stalled(
            f"{what} made no progress for {limit}: a stage is stuck or cannot be scheduled (check pool "
            f"sizes against the cluster's CPUs, GPUs and custom resources). "
            f"{' '.join(str(exc).split())[:1500]}"
        ) from None


__all__ = ["Stalled", "configure_context", "init_ray", "stall_guarded", "wait_for_min_actors"]
