"""How each stage runs on a cluster: pool sizes, CPUs/GPUs per actor, batch sizes.

:func:`plan_resources` is a pure function of the configuration and the cluster's
resources, so the sizing rules are tested without a cluster. Read, decode and
write run as tasks with fractional CPUs; the network and the CRF run on actor
pools. Pools together leave at least the read + decode + write CPUs free:
otherwise the tasks cannot be scheduled and Ray Data stalls silently; a plan
whose pools cannot all be placed (GPUs or CPUs) is a
:class:`~pipeline.config.ConfigError`, and a run that still stalls fails after
``ray.no_progress_timeout_s`` (:mod:`pipeline.execution`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import ConfigError, SegmentConfig

GPU_NETWORK_BATCH = 8
CPU_NETWORK_BATCH = 2
DEFAULT_WRITE_POOL = 2
MIN_FRACTION = 0.25
DECODE_BYTES_PER_PIXEL = 6
MIN_DECODE_MEMORY_BYTES = 64 * 1024**2
TASKS_CPU_FRACTION = 0.1  # CPUs kept for read/decode/write tasks on large nodes


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_memory_bytes(max_pixels: int) -> int:
    """Memory a decode task reserves: the largest allowed image decoded and converted (~6 bytes/pixel).

    Declaring it also keeps decode a separate operator: Ray Data fuses a task stage
    into the next actor stage when their remote arguments match (they do on CPU-only
    clusters), which would decode inside the network actors, behind the model.
    """
    return max(MIN_DECODE_MEMORY_BYTES, DECODE_BYTES_PER_PIXEL * max_pixels)


def plan_resources(
    config: SegmentConfig, *, cpus: float, gpus: float = 0.0, custom: Mapping[str, float] | None = None
) -> ResourcePlan:
    """Pool and batch sizes for a cluster with ``cpus`` CPUs, ``gpus`` GPUs and ``custom`` resources."""
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
        network_pool = net.pool_size or max(1, int(gpus // per_gpu + 1e-9))
        network_num_cpus = net.num_cpus or min(1.0, free / 2)
        network_batch = net.batch_size or GPU_NETWORK_BATCH
        network_device = "auto" if net.device == "auto" else net.device
        threads = net.threads or 1
    else:
        network_pool = net.pool_size or 1
        network_num_gpus = 0.0
        network_num_cpus = net.num_cpus or max(MIN_FRACTION, min(float(max(1, int(cpus // 4))), free / 2))
        network_batch = net.batch_size or CPU_NETWORK_BATCH
        network_device = "cpu"
        threads = net.threads or max(1, int(network_num_cpus))
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
    if crf.pool_size:
        crf_pool = crf.pool_size
    elif crf.resources:  # as many as the custom resource allows, within the free CPUs
        slots = min(int(custom.get(name, 0.0) // amount + 1e-9) for name, amount in crf.resources.items())
        crf_pool = max(1, min(slots, int(free // crf_num_cpus + 1e-9)))
    elif crf_num_gpus > 0:
        crf_pool = network_pool
    else:
        crf_pool = max(1, int(free // crf_num_cpus + 1e-9))
        if free < crf_num_cpus:  # small machine: one CRF actor on what is left
            crf_num_cpus = max(MIN_FRACTION, math.floor(free * 4) / 4)
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
    )


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
    return float(total.get("CPU", 1.0)), float(total.get("GPU", 0.0)), custom
