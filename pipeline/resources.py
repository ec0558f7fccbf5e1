"""How each stage runs on a cluster: pool sizes, CPUs/GPUs per actor, batch sizes.

:func:`plan_resources` is a pure function of the configuration and the cluster's
resources, so the sizing rules are tested without a cluster. Read, decode and
write run as tasks with fractional CPUs; the network and the CRF run on actor
pools. Pools together leave at least the read + decode + write CPUs free:
otherwise the tasks cannot be scheduled and Ray Data stalls silently; a plan
whose pools cannot all be placed (GPUs or CPUs) is a
:class:`~pipeline.config.ConfigError`, and a run that still stalls fails after
``ray.no_progress_timeout_s`` (:mod:`pipeline.execution`).

Elastic pools: each pool has a minimum (the size planned on the cluster as it is,
or ``min_pool_size``) and a maximum (``max_pool_size``, else what the autoscaler's
node groups can hold where Ray exposes them, else the minimum: a fixed pool, as on a
static cluster). :func:`plan_for_cluster` plans on the connected cluster; when the
cluster cannot hold the minimum pools (a head with ``num-cpus: 0`` and worker groups
at zero nodes) and an autoscaler can add nodes, it asks the autoscaler for them
(``ray.autoscaler.sdk.request_resources``) and waits up to ``ray.autoscale_wait_s``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import ConfigError, SegmentConfig

log = logging.getLogger(__name__)

GPU_NETWORK_BATCH = 8
CPU_NETWORK_BATCH = 2
DEFAULT_WRITE_POOL = 2
MIN_FRACTION = 0.25
DECODE_BYTES_PER_PIXEL = 6
MIN_DECODE_MEMORY_BYTES = 64 * 1024**2
TASKS_CPU_FRACTION = 0.1  # CPUs kept for read/decode/write tasks on large nodes
#: Seconds between two looks at the cluster while the autoscaler adds nodes. The request is sent again each time:
#: requests replace each other, and Ray Data's autoscaling coordinator (a detached actor once any Ray Data job ran
#: on the cluster) sends its own every 20 s.
AUTOSCALE_POLL_S = 2.0
#: How often a waiting run says what it still waits for.
AUTOSCALE_REPORT_S = 30.0
#: Node types of Ray's read-only autoscaler (``ray start`` without an autoscaling config): it never adds a node.
READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")
#: Most actors of a pool whose node group Ray reports as unbounded.
UNBOUNDED_POOL = 4096


class ResourcesUnavailable(RuntimeError):
    """The cluster did not grow to the run's minimum pools within ``ray.autoscale_wait_s``."""


@dataclass(frozen=True)
class ResourcePlan:
    """How each stage is run on this cluster (the resolved form of the config's pool settings)."""

    read_num_cpus: float
    read_batch_size: int
    decode_num_cpus: float
    decode_batch_size: int
    decode_memory_bytes: int
    network_pool: int
    network_batch_size: int
    network_num_cpus: float
    network_num_gpus: float
    network_device: str
    network_threads: int
    crf_pool: int
    crf_batch_size: int
    crf_num_cpus: float
    crf_num_gpus: float
    crf_device: str
    crf_resources: dict[str, float] = field(default_factory=dict)
    write_num_cpus: float = MIN_FRACTION
    write_batch_size: int = 64
    network_max_pool: int = 0  # elastic pools: most actors (0 = the pool is fixed at network_pool)
    crf_max_pool: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def network_bounds(self) -> tuple[int, int]:
        """``(min, max)`` actors of the network pool."""
        return self.network_pool, max(self.network_pool, self.network_max_pool)

    @property
    def crf_bounds(self) -> tuple[int, int]:
        """``(min, max)`` actors of the CRF pool."""
        return self.crf_pool, max(self.crf_pool, self.crf_max_pool)


def decode_memory_bytes(max_pixels: int) -> int:
    """Memory a decode task reserves: the largest allowed image decoded and converted (~6 bytes/pixel).

    Declaring it also keeps decode a separate operator: Ray Data fuses a task stage
    into the next actor stage when their remote arguments match (they do on CPU-only
    clusters), which would decode inside the network actors, behind the model.
    """
    return max(MIN_DECODE_MEMORY_BYTES, DECODE_BYTES_PER_PIXEL * max_pixels)


def plan_resources(
    config: SegmentConfig, *, cpus: float, gpus: float = 0.0, custom: Mapping[str, float] | None = None,
    grow_to: Mapping[str, float] | None = None,
) -> ResourcePlan:
    """Pool and batch sizes for a cluster with ``cpus`` CPUs, ``gpus`` GPUs and ``custom`` resources.

    The pools' minimum sizes are planned on those resources (``min_pool_size``/``pool_size``
    when set); ``grow_to``, the most of each resource the autoscaler's node groups can
    reach (None: unknown), sets the maxima that ``max_pool_size`` leaves open.
    """
    custom = dict(custom or {})
    net, crf = config.network, config.crf
    tasks_cpus = config.read.num_cpus + config.decode.num_cpus + config.write.num_cpus
    free = max(cpus - max(tasks_cpus, TASKS_CPU_FRACTION * cpus), MIN_FRACTION)
    crf_gpu_share = crf.num_gpus if crf.backend == "torch" else 0.0
    if net.device == "cuda" and gpus <= 0:
        raise ConfigError(
            "network.device: 'cuda' was asked for but the cluster has no GPU (its resources list GPU=0); "
            "use cpu, or auto to use a GPU only when there is one"
        )
    use_gpu = gpus > 0 and net.device != "cpu"

    if use_gpu:
        network_num_gpus = net.num_gpus
        if crf_gpu_share > 0 and network_num_gpus + crf_gpu_share > 1 + 1e-9:
            # a CRF actor sharing the GPU must fit beside the network actor, or it never starts
            network_num_gpus = round(1.0 - crf_gpu_share, 6)
        per_gpu = network_num_gpus + crf_gpu_share
        network_pool = net.pool_size or net.min_pool_size or max(1, int(gpus // per_gpu + 1e-9))
        network_num_cpus = net.num_cpus or min(1.0, free / 2)
        network_batch = net.batch_size or GPU_NETWORK_BATCH
        network_device = "auto" if net.device == "auto" else net.device
        threads = net.threads or 1
    else:
        per_gpu = 0.0
        network_pool = net.pool_size or net.min_pool_size or 1
        network_num_gpus = 0.0
        network_num_cpus = net.num_cpus or max(MIN_FRACTION, min(float(max(1, int(cpus // 4))), free / 2))
        network_batch = net.batch_size or CPU_NETWORK_BATCH
        network_device = "cpu"
        threads = net.threads or max(1, int(network_num_cpus))
    if net.pool_size:
        network_max = network_pool
    elif net.max_pool_size:
        network_max = net.max_pool_size
        network_pool = min(network_pool, network_max)
    elif grow_to is not None and per_gpu > 0:
        network_max = _slots(grow_to.get("GPU", 0.0), per_gpu)
    else:
        network_max = network_pool
    network_max = max(network_max, network_pool)
    free = max(free - network_pool * network_num_cpus, 0.0)

    crf_num_cpus = crf.num_cpus
    crf_num_gpus = crf_gpu_share if use_gpu else 0.0
    for name, amount in crf.resources.items():
        if custom.get(name, 0.0) + 1e-9 < amount:
            raise ConfigError(
                f"crf.resources.{name}: each CRF actor asks for {amount:g}, but the cluster offers "
                f"{custom.get(name, 0.0):g} (custom resources: {sorted(custom) or 'none'}); start the CRF "
                f"nodes with --resources='{{\"{name}\": N}}' or drop crf.resources"
            )
    if crf.pool_size or crf.min_pool_size:
        crf_pool = crf.pool_size or crf.min_pool_size
    elif crf.resources:  # as many as the custom resource allows, within the free CPUs
        slots = min(int(custom.get(name, 0.0) // amount + 1e-9) for name, amount in crf.resources.items())
        crf_pool = max(1, min(slots, int(free // crf_num_cpus + 1e-9)))
    elif crf_num_gpus > 0:
        crf_pool = network_pool
    else:
        crf_pool = max(1, int(free // crf_num_cpus + 1e-9))
        if free < crf_num_cpus:  # small machine: one CRF actor on what is left
            crf_num_cpus = max(MIN_FRACTION, math.floor(free * 4) / 4)
    if crf.pool_size:
        crf_max = crf_pool
    elif crf.max_pool_size:
        crf_max = crf.max_pool_size
        crf_pool = min(crf_pool, crf_max)
    elif grow_to is not None:
        if crf.resources:
            crf_max = min(_slots(grow_to.get(name, 0.0), amount) for name, amount in crf.resources.items())
        elif crf_num_gpus > 0:
            crf_max = network_max
        else:  # the CPUs the autoscaler can add, less what the network pool and the tasks take there
            grown_cpus = grow_to.get("CPU", 0.0)
            grown_free = grown_cpus - max(tasks_cpus, TASKS_CPU_FRACTION * grown_cpus) - network_max * network_num_cpus
            crf_max = _slots(grown_free, crf_num_cpus)
    else:
        crf_max = crf_pool
    crf_max = max(crf_max, crf_pool)
    crf_device = "cuda" if crf_num_gpus > 0 else "cpu"
    _check_fits(network_pool=network_pool, network_num_cpus=network_num_cpus, network_num_gpus=network_num_gpus,
                crf_pool=crf_pool, crf_num_cpus=crf_num_cpus, crf_num_gpus=crf_num_gpus, config=config,
                cpus=cpus, gpus=gpus)

    return ResourcePlan(
        read_num_cpus=config.read.num_cpus,
        read_batch_size=min(config.read.batch_size, config.output.rows_per_file),
        decode_num_cpus=config.decode.num_cpus,
        # blocks keep the read tasks' size downstream: pools stay busy, commits stay small
        decode_batch_size=min(config.decode.batch_size, config.read.batch_size, config.output.rows_per_file),
        decode_memory_bytes=decode_memory_bytes(config.decode.max_pixels),
        network_pool=network_pool,
        network_batch_size=network_batch,
        network_num_cpus=network_num_cpus,
        network_num_gpus=network_num_gpus,
        network_device=network_device,
        network_threads=threads,
        crf_pool=crf_pool,
        crf_batch_size=crf.batch_size,
        crf_num_cpus=crf_num_cpus,
        crf_num_gpus=crf_num_gpus,
        crf_device=crf_device,
        crf_resources=dict(crf.resources),
        write_num_cpus=config.write.num_cpus,
        write_batch_size=config.output.rows_per_file,
        network_max_pool=network_max,
        crf_max_pool=crf_max,
    )


def _slots(available: float, each: float) -> int:
    """Actors of ``each`` that ``available`` holds (capped: an unbounded node group reports sys.maxsize)."""
    if each <= 0 or available <= 0:
        return 0
    return min(UNBOUNDED_POOL, int(available // each + 1e-9))


def _check_fits(
    *, network_pool: int, network_num_cpus: float, network_num_gpus: float, crf_pool: int, crf_num_cpus: float,
    crf_num_gpus: float, config: SegmentConfig, cpus: float, gpus: float,
) -> None:
    """Raise ConfigError when the actor pools cannot all start, or leave no CPU for a read task."""
    need_gpus = network_pool * network_num_gpus + crf_pool * crf_num_gpus
    if need_gpus > gpus + 1e-6:
        raise ConfigError(
            f"network.pool_size x network.num_gpus + crf.pool_size x crf.num_gpus = {network_pool} x "
            f"{network_num_gpus:g} + {crf_pool} x {crf_num_gpus:g} = {need_gpus:g} GPUs, but the cluster has "
            f"{gpus:g}: lower the pool sizes or the GPU shares (the pools would wait for GPUs forever)"
        )
    task = max(config.read.num_cpus, config.decode.num_cpus, config.write.num_cpus)
    need_cpus = network_pool * network_num_cpus + crf_pool * crf_num_cpus + task
    if need_cpus > cpus + 1e-6:
        raise ConfigError(
            f"network.pool_size x network.num_cpus + crf.pool_size x crf.num_cpus + one read/decode/write task = "
            f"{network_pool} x {network_num_cpus:g} + {crf_pool} x {crf_num_cpus:g} + {task:g} = {need_cpus:g} "
            f"CPUs, but the cluster has {cpus:g}: lower the pool sizes or CPUs per actor (else the job stalls)"
        )


def cluster_resources() -> tuple[float, float, dict[str, float]]:
    """``(cpus, gpus, custom)`` of the connected Ray cluster."""
    import ray

    total = ray.cluster_resources()
    custom = {k: v for k, v in total.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
              and not k.startswith("node:") and not k.startswith("accelerator_type")}
    return float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0)), custom


# ---------------------------------------------------------------------------- autoscaling clusters


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the autoscaler's node groups can reach, where Ray exposes them (else None).

    Ray publishes them only when something reports the node groups to the GCS
    (``ReportClusterConfig``, e.g. a hosted platform); nothing in the Ray 2.60 wheel does:
    it is None under autoscaler v1 and v2 (checked with the fake multi-node provider), so
    on KubeRay and cluster-launcher clusters the maxima come from ``max_pool_size``.
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: unknown is the safe answer
        return None
    return {str(k): float(v) for k, v in limits.items()} if limits else None


def cluster_can_grow() -> bool:
    """False where no autoscaler can add a node: Ray started by this process (a local instance), or a
    cluster whose autoscaler is Ray's read-only one (``ray start`` without ``--autoscaling-config``)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and getattr(node, "head", False):
        return False
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001 - autoscaler v2 keeps its state elsewhere: assume it can grow
        return True
    types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
    types |= set(report.get("pending_launches") or {})
    return not (types and all(READONLY_NODE_TYPE.fullmatch(t) for t in types))


@dataclass(frozen=True)
class Bundle:
    """``count`` actors (or tasks) of ``resources`` each, for ``what``."""

    what: str
    count: int
    resources: dict[str, float]


def min_bundles(config: SegmentConfig, *, gpu: bool) -> list[Bundle]:
    """What the run's minimum pools and one read/decode/write task take: the request to the autoscaler.

    ``gpu``: the network actors take a GPU each (``network.num_gpus``), else CPUs only.
    """
    net, crf = config.network, config.crf
    crf_gpu = crf.num_gpus if gpu and crf.backend == "torch" else 0.0
    network: dict[str, float] = {"CPU": net.num_cpus or 1.0}
    if gpu:
        network["GPU"] = net.num_gpus if net.num_gpus + crf_gpu <= 1 + 1e-9 else round(1.0 - crf_gpu, 6)
    crf_actor = {"CPU": crf.num_cpus, **crf.resources}
    if crf_gpu:
        crf_actor["GPU"] = crf_gpu
    tasks = config.read.num_cpus + config.decode.num_cpus + config.write.num_cpus
    return [Bundle("network actors", net.pool_size or net.min_pool_size or 1, network),
            Bundle("CRF actors", crf.pool_size or crf.min_pool_size or 1, crf_actor),
            Bundle("read/decode/write tasks", 1, {"CPU": tasks})]


def _total(bundles: list[Bundle]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.resources.items():
            total[name] = total.get(name, 0.0) + bundle.count * amount
    return total


def _short(have: Mapping[str, float], bundles: list[Bundle]) -> dict[str, tuple[float, float]]:
    """``{resource: (have, need)}`` for each resource the cluster has less of than ``bundles`` take."""
    return {name: (have.get(name, 0.0), need) for name, need in _total(bundles).items()
            if have.get(name, 0.0) + 1e-9 < need}


def _describe(bundles: list[Bundle]) -> str:
    def one(resources: Mapping[str, float]) -> str:
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"

    return ", ".join(f"{b.count} x {one(b.resources)} ({b.what})" for b in bundles)


def _describe_short(short: Mapping[str, tuple[float, float]]) -> str:
    return ", ".join(f"{name} {have:g} of {need:g}" for name, (have, need) in short.items())


def _autoscaler_state() -> str:
    """One line of what the autoscaler last reported (v1): launches pending, nodes that failed."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001
        return ""
    if not report:
        return ""
    failed = [node_type for _, node_type in report.get("failed_nodes") or []]
    return (f" The autoscaler reports nodes {dict(report.get('active_nodes') or {})}, launching "
            f"{dict(report.get('pending_launches') or {})}, failed {failed or 'none'}.")


def request_resources(bundles: list[Bundle]) -> None:
    """Ask the autoscaler for ``bundles`` (replaces any earlier request; an empty list releases it)."""
    from ray.autoscaler.sdk import request_resources as ask

    ask(bundles=[dict(b.resources) for b in bundles for _ in range(b.count)])


def release_resources() -> None:
    """Withdraw this run's request (the autoscaler may then scale the nodes down when they idle)."""
    try:
        request_resources([])
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; the request lapses with the cluster
        log.warning("could not withdraw the request to the autoscaler (%s: %s)", type(exc).__name__, exc)


def plan_for_cluster(
    config: SegmentConfig, *, wait_s: float, poll_s: float = AUTOSCALE_POLL_S
) -> tuple[ResourcePlan, bool]:
    """The plan for the connected cluster, and whether the autoscaler was asked for nodes.

    A cluster that holds the minimum pools is planned at once. Otherwise, where an
    autoscaler can add nodes (:func:`cluster_can_grow`) and ``wait_s`` > 0, the autoscaler
    is asked for the minimum pools (:func:`min_bundles`) and the cluster is polled until
    it holds them, up to ``wait_s``; then :class:`ResourcesUnavailable` names what is
    still missing. ``network.device: auto`` asks for GPU nodes too unless Ray reports node
    groups without GPUs; if the GPUs do not come in time but the rest did, the network
    runs on CPUs (``cuda`` requires them). A cluster that cannot grow, or ``wait_s`` = 0,
    gives the plan's :class:`~pipeline.config.ConfigError` at once (as on a static cluster).
    On success the request stays in place (keeping those nodes) until
    :func:`release_resources`; on failure it is withdrawn here.
    """
    cpus, gpus, custom = cluster_resources()
    limits = autoscaler_limits()
    try:
        return plan_resources(config, cpus=cpus, gpus=gpus, custom=custom, grow_to=limits), False
    except ConfigError as exc:
        if wait_s <= 0 or not cluster_can_grow():
            raise
        refusal = exc

    device = config.network.device
    required = min_bundles(config, gpu=device == "cuda")
    gpu_reachable = limits is None or limits.get("GPU", 0.0) > 0
    wanted = min_bundles(config, gpu=device == "cuda" or (device == "auto" and gpu_reachable))
    if limits is not None:
        unreachable = _short(limits, required)
        if unreachable:
            raise ConfigError(
                f"the run's minimum pools need {_describe(required)}, but the autoscaler's node groups reach at most "
                f"{_describe_short(unreachable)}: add a node group with these resources, or lower the pools"
            )
    started = time.monotonic()
    deadline = started + wait_s
    next_report = started
    request_resources(wanted)
    try:
        while True:
            cpus, gpus, custom = cluster_resources()
            have = {"CPU": cpus, "GPU": gpus, **custom}
            timed_out = time.monotonic() >= deadline
            if not _short(have, wanted) or (timed_out and not _short(have, required)):
                try:
                    plan = plan_resources(config, cpus=cpus, gpus=gpus, custom=custom, grow_to=limits)
                except ConfigError as exc:
                    refusal = exc
                else:
                    if _short(have, wanted):
                        log.warning("the autoscaler added no GPU node within ray.autoscale_wait_s = %g s: the network "
                                    "runs on CPUs (network.device: cuda waits for GPUs or fails)", wait_s)
                    log.info("the cluster grew in %.0f s to %s", time.monotonic() - started, have)
                    return plan, True
            if not cluster_can_grow():  # the autoscaler's first report came meanwhile: Ray's read-only one
                raise refusal
            if timed_out:
                short = _short(have, required) or _short(have, wanted)
                if short:
                    why = (f"the cluster offers {_describe_short(short)}. No node group offers that, its group is at "
                           f"its max_workers, or its nodes failed to start (`ray status` and the autoscaler's log, "
                           f"monitor.log on the head, say which)")
                else:
                    why = f"the cluster offers that much, but the plan does not fit: {refusal}"
                raise ResourcesUnavailable(
                    f"the cluster did not grow to this run's minimum pools within ray.autoscale_wait_s = {wait_s:g} s: "
                    f"the autoscaler was asked for {_describe(wanted)}; {why}.{_autoscaler_state()}"
                )
            if time.monotonic() >= next_report:
                log.warning("waiting for the autoscaler (up to ray.autoscale_wait_s = %g s): asked for %s; the cluster "
                            "offers %s", wait_s, _describe(wanted), _describe_short(_short(have, wanted)) or "them")
                next_report = time.monotonic() + AUTOSCALE_REPORT_S
            time.sleep(poll_s)
            request_resources(wanted)
    except BaseException:
        release_resources()
        raise
