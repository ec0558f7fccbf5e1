"""The segment job's configuration: one flat, schema-validated file (YAML or TOML).

Sections mirror the stages (``input``, ``output``, ``s3``, ``model``, ``read``,
``decode``, ``network``, ``crf``, ``write``, ``ray``); every key is typed and
checked, unknown keys are errors, and every error names the field with the
expected and the actual value. No inheritance, no includes: the file is the
setting. Command-line flags override the file; :func:`resolved` gives what ran
(secrets redacted), which is written to ``_run.json`` and the Parquet metadata.

The network's preprocessing (mean, channel order, input size) is *not* here: it
travels with the checkpoint's record.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.io.sources import FORMATS, IMAGE_EXTENSIONS
from pipeline.io.uris import S3Settings
from pipeline.outputs.lease import DEFAULT_TTL_S as DEFAULT_LEASE_TTL_S
from pipeline.outputs.lease import MIN_TTL_S as MIN_LEASE_TTL_S
from pipeline.resolution import NETWORK, check_resolution

CRF_BACKENDS: tuple[str, ...] = ("pydensecrf", "torch")
#: Pixels the CRF refines per image, at its working resolution (``crf.resolution``): 16 MP
#: (4608 x 3456). Measured peak of the CRF stage (pydensecrf, 21 classes): ~0.9 KB per refined
#: pixel on a photo, ~2 KB on noise, so ~14 GB at the limit; it binds only with
#: ``crf.resolution: full`` (or a large side), since the default refines at the network's size.
DEFAULT_CRF_MAX_PIXELS = 16_000_000
NETWORK_MODES: tuple[str, ...] = ("resize", "slide")
#: Slide mode: share of a tile that overlaps its neighbour (mmsegmentation's 512/341 crop/stride is 1/3).
DEFAULT_TILE_OVERLAP = 1 / 3
#: A run that makes no progress for this long fails with a message (instead of hanging).
DEFAULT_NO_PROGRESS_TIMEOUT_S = 900.0
#: How long a run on an autoscaling cluster waits for the nodes of its minimum pools (a cold GPU node on a cloud,
#: with a CUDA image to pull, takes minutes).
DEFAULT_AUTOSCALE_WAIT_S = 600.0


class ConfigError(ValueError):
    """A configuration value that does not fit the schema (names the field)."""


@dataclass(frozen=True)
class InputConfig:
    uri: str = ""  # folder/prefix of images or tar shards, one image, or a .parquet manifest
    format: Literal["auto", "images", "webdataset", "manifest"] = "auto"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    uri_column: str = "uri"  # manifest column of image URIs
    bytes_column: str = "bytes"  # manifest column of image bytes (used when there is no uri column)
    key_column: str = "key"  # with bytes: the column naming each image (else its content hash)
    limit: int = 0  # process at most this many new images (0 = all)


@dataclass(frozen=True)
class TrainingConfig:
    ignore_below: float = 0.0  # pixels whose chosen-class marginal is below this count as ignored (0 = none)
    format: Literal["", "webdataset", "hf-parquet"] = ""  # write training shards under training/ as the run goes
    shard_mb: int = 256  # target size of the training shards, merged after each run (docs/training-data.md)

    @property
    def enabled(self) -> bool:
        return bool(self.format)


@dataclass(frozen=True)
class OutputConfig:
    uri: str = ""  # folder/prefix for masks/, segments/, class_stats.parquet, _run.json
    rows_per_file: int = 64  # rows per segments/*.parquet file committed during a run (what a kill can lose)
    compact_rows: int = 4096  # rows per compacted segments file after the run (0 = never compact)
    allow_mixed: bool = False  # resume into an output made with other weights / CRF parameters
    confidence: bool = False  # also write confidence/<image_id>.png (8-bit marginal of the chosen class);
    # always on with training.format (a later export can then change the threshold without rerunning the model)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S  # one writer per output: a killed run's lease lapses after this; 0 = none
    wait_for_lock_s: float = 0.0  # output in use by another run: wait up to this long for it (0 = refuse at once)


@dataclass(frozen=True)
class ModelConfig:
    weights: str = ""  # checkpoint path/URI; empty = the bundled demo model


@dataclass(frozen=True)
class ReadConfig:
    num_cpus: float = 0.25  # per read task (fractional: see the silent-hang note in docs)
    batch_size: int = 8  # images per read task and per block downstream (bounds a task's bytes; small blocks
    # keep the actor pools busy and make commits small)


@dataclass(frozen=True)
class DecodeConfig:
    num_cpus: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images become error rows
    batch_size: int = 16


@dataclass(frozen=True)
class NetworkConfig:
    pool_size: int = 0  # a fixed number of actors; 0 = one per GPU (or 1 CPU actor without GPUs), or elastic below
    min_pool_size: int = 0  # elastic pool: actors the run waits for before it starts; 0 = what the cluster holds now
    max_pool_size: int = 0  # elastic pool: most actors; 0 = what the autoscaler's node groups hold where Ray exposes
    # them, else the starting size (a fixed pool, as on a static cluster)
    batch_size: int = 0  # 0 = 8 on GPU, 2 on CPU
    num_gpus: float = 1.0  # per actor when the cluster has GPUs
    num_cpus: float = 0.0  # per actor; 0 = 1 with GPUs, else a share of the CPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch threads in a CPU actor; 0 = its CPU share (at least 1)
    mode: Literal["resize", "slide"] = "resize"  # resize: shrink to the record's input size; slide: native tiles
    tile_size: int = 0  # slide: tile side, 8k+1 px; 0 = the record's input size
    tile_overlap: float = DEFAULT_TILE_OVERLAP  # slide: share of a tile shared with the next one, in [0, 0.75]


@dataclass(frozen=True)
class CRFConfig:
    enabled: bool = True
    backend: Literal["pydensecrf", "torch"] = "pydensecrf"
    params: str = ""  # preset name or a JSON/YAML file of CRF parameters; "" = the model variant's preset
    pool_size: int = 0  # a fixed number of actors; 0 = derived from the cluster's CPUs (or custom resources)
    min_pool_size: int = 0  # elastic pool: actors the run waits for before it starts; 0 = what the cluster holds now
    max_pool_size: int = 0  # elastic pool: most actors; 0 = what the autoscaler's node groups hold where Ray exposes
    # them, else the starting size (a fixed pool)
    batch_size: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # >0 runs the torch backend on the GPU (share it with the network)
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {crf_node = 1} pins to nodes
    resolution: int | str = NETWORK  # "network" (the record's input size), "full", or a longer side in px
    max_pixels: int = DEFAULT_CRF_MAX_PIXELS  # pixels refined (at the working resolution); more = error row


@dataclass(frozen=True)
class WriteConfig:
    num_cpus: float = 0.25  # per write task (writes are tasks: as many run as the CPUs allow)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS or a new local instance
    no_progress_timeout_s: float = DEFAULT_NO_PROGRESS_TIMEOUT_S  # fail a run stalled this long; 0 = never
    progress: bool = True
    verbose: bool = False  # show Ray's own log lines on the console (else only in Ray's log files)
    # A cluster that cannot hold the smallest plan (e.g. a head with num-cpus 0 and worker groups at 0 nodes): ask
    # its autoscaler for the minimum pools and wait up to this long for the nodes; 0 = refuse at once
    autoscale_wait_s: float = DEFAULT_AUTOSCALE_WAIT_S


@dataclass(frozen=True)
class SegmentConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    s3: S3Settings = field(default_factory=S3Settings)
    model: ModelConfig = field(default_factory=ModelConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, *, name: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, name=name)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp, *_) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, name=f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, name=name): _coerce(v, value_tp, name=f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{name}: unsupported schema type {tp!r}")


#: Fields of earlier releases that no longer exist, and why (a clearer error than "unknown field").
REMOVED_FIELDS: dict[str, str] = {
    "write.pool_size": "removed: masks and segments files are written by tasks (write.num_cpus each), not by an "
                       "actor pool; delete the key",
}


def _build(cls: type, data: Mapping[str, Any], *, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    for key in data:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in REMOVED_FIELDS:
            raise ConfigError(f"{dotted}: {REMOVED_FIELDS[dotted]}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field; expected one of {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value, prefix=name)
        else:
            kwargs[key] = _coerce(value, tp, name=name)
    return cls(**kwargs)


def _check_ranges(config: SegmentConfig) -> None:
    checks = [
        ("input.limit", config.input.limit, config.input.limit >= 0, ">= 0"),
        ("output.rows_per_file", config.output.rows_per_file, config.output.rows_per_file >= 1, ">= 1"),
        ("read.num_cpus", config.read.num_cpus, config.read.num_cpus > 0, "> 0"),
        ("output.training.ignore_below", config.output.training.ignore_below,
         0 <= config.output.training.ignore_below <= 1, "in [0, 1]"),
        ("output.compact_rows", config.output.compact_rows, config.output.compact_rows >= 0, ">= 0"),
        ("output.training.shard_mb", config.output.training.shard_mb, config.output.training.shard_mb >= 1, ">= 1"),
        ("output.lease_ttl_s", config.output.lease_ttl_s,
         config.output.lease_ttl_s == 0 or MIN_LEASE_TTL_S <= config.output.lease_ttl_s < math.inf,
         f"0 (no lease) or >= {MIN_LEASE_TTL_S:g} (a heartbeat every third of it must get through)"),
        ("output.wait_for_lock_s", config.output.wait_for_lock_s, config.output.wait_for_lock_s >= 0, ">= 0"),
        ("read.batch_size", config.read.batch_size, config.read.batch_size >= 1, ">= 1"),
        ("decode.num_cpus", config.decode.num_cpus, config.decode.num_cpus > 0, "> 0"),
        ("decode.max_pixels", config.decode.max_pixels, config.decode.max_pixels >= 1, ">= 1"),
        ("decode.batch_size", config.decode.batch_size, config.decode.batch_size >= 1, ">= 1"),
        ("network.pool_size", config.network.pool_size, config.network.pool_size >= 0, ">= 0"),
        ("network.min_pool_size", config.network.min_pool_size, config.network.min_pool_size >= 0, ">= 0"),
        ("network.max_pool_size", config.network.max_pool_size, config.network.max_pool_size >= 0, ">= 0"),
        ("network.batch_size", config.network.batch_size, config.network.batch_size >= 0, ">= 0"),
        ("network.num_gpus", config.network.num_gpus, 0 < config.network.num_gpus <= 1, "in (0, 1]"),
        ("network.num_cpus", config.network.num_cpus, config.network.num_cpus >= 0, ">= 0"),
        ("network.threads", config.network.threads, config.network.threads >= 0, ">= 0"),
        ("network.tile_size", config.network.tile_size,
         config.network.tile_size == 0 or (config.network.tile_size >= 65 and config.network.tile_size % 8 == 1),
         "0 (the record's input size) or 8k+1 >= 65, e.g. 513"),
        ("network.tile_overlap", config.network.tile_overlap, 0 <= config.network.tile_overlap <= 0.75,
         "in [0, 0.75]"),
        ("crf.pool_size", config.crf.pool_size, config.crf.pool_size >= 0, ">= 0"),
        ("crf.min_pool_size", config.crf.min_pool_size, config.crf.min_pool_size >= 0, ">= 0"),
        ("crf.max_pool_size", config.crf.max_pool_size, config.crf.max_pool_size >= 0, ">= 0"),
        ("crf.batch_size", config.crf.batch_size, config.crf.batch_size >= 1, ">= 1"),
        ("crf.num_cpus", config.crf.num_cpus, config.crf.num_cpus > 0, "> 0"),
        ("crf.num_gpus", config.crf.num_gpus, 0 <= config.crf.num_gpus < 1, "in [0, 1) (it shares a GPU)"),
        ("crf.max_pixels", config.crf.max_pixels, config.crf.max_pixels >= 1, ">= 1"),
        ("write.num_cpus", config.write.num_cpus, config.write.num_cpus > 0, "> 0"),
        ("ray.no_progress_timeout_s", config.ray.no_progress_timeout_s, config.ray.no_progress_timeout_s >= 0, ">= 0"),
        ("ray.autoscale_wait_s", config.ray.autoscale_wait_s, 0 <= config.ray.autoscale_wait_s < math.inf,
         ">= 0 and finite"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    if config.input.format not in FORMATS:  # pragma: no cover - Literal already checked
        raise ConfigError(f"input.format: expected one of {FORMATS}, got {config.input.format!r}")
    try:
        check_resolution(config.crf.resolution)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.output.training.enabled and config.output.lease_ttl_s == 0:
        raise ConfigError("output.lease_ttl_s: 0 (no lease) cannot keep training data exactly once (two runs "
                          "writing one output would put images in two shards); keep the lease, or drop "
                          "output.training.format")
    for section in ("network", "crf"):
        pool = getattr(config, section)
        if pool.pool_size and (pool.min_pool_size or pool.max_pool_size):
            raise ConfigError(
                f"{section}.pool_size: a fixed pool of {pool.pool_size} actors, but {section}.min_pool_size / "
                f"max_pool_size = {pool.min_pool_size} / {pool.max_pool_size} ask for an elastic one; set either "
                f"pool_size or the min/max bounds"
            )
        if pool.min_pool_size and pool.max_pool_size and pool.min_pool_size > pool.max_pool_size:
            raise ConfigError(f"{section}.min_pool_size: expected <= {section}.max_pool_size = {pool.max_pool_size}, "
                              f"got {pool.min_pool_size}")
    for name, amount in config.crf.resources.items():
        if amount <= 0:
            raise ConfigError(f"crf.resources.{name}: expected > 0, got {amount!r}")
    if config.crf.num_gpus > 0 and config.crf.backend != "torch":
        raise ConfigError(
            f"crf.num_gpus: only the 'torch' backend runs on a GPU, got num_gpus={config.crf.num_gpus} "
            f"with backend {config.crf.backend!r}; set crf.backend = 'torch' or crf.num_gpus = 0"
        )


def from_mapping(data: Mapping[str, Any], *, source: str = "config") -> SegmentConfig:
    """Validate a nested mapping (as read from a file) into a :class:`SegmentConfig`."""
    try:
        config = _build(SegmentConfig, data or {}, prefix="")
        _check_ranges(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: str | Path | None) -> SegmentConfig:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` configuration file (None: all defaults)."""
    if path is None:
        return SegmentConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: expected a .yaml, .yml, .toml or .json file, got suffix {path.suffix!r}")
    return from_mapping(_parse(text, suffix=suffix, path=path), source=str(path))


def _parse(text: str, *, suffix: str, path: Path) -> Any:
    """The file's mapping; syntax errors become ConfigError naming the file and line."""
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {' '.join(str(problem).split())}") from None


def override(config: SegmentConfig, **changes: Any) -> SegmentConfig:
    """``override(config, **{"crf.enabled": False, "input.uri": "s3://b/x"})``: validated dotted overrides."""
    data = to_dict(config, redact=False)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        place = data
        for part in path:
            if not isinstance(place.get(part), dict):
                raise ConfigError(f"{dotted}: unknown field")
            place = place[part]
        if not path or key not in place:
            raise ConfigError(f"{dotted}: unknown field")
        place[key] = list(value) if isinstance(value, tuple) else value
    return from_mapping(data, source="command line")


def to_dict(config: Any, *, redact: bool = True) -> dict[str, Any]:
    """A JSON-ready dict of the configuration (S3 secrets replaced by ``***`` unless ``redact=False``)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, S3Settings):
            out[f.name] = value.redacted() if redact else {g.name: getattr(value, g.name) for g in fields(value)}
        elif is_dataclass(value):
            out[f.name] = to_dict(value, redact=redact)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = dict(value)
        else:
            out[f.name] = value
    return out


__all__ = [
    "DEFAULT_AUTOSCALE_WAIT_S",
    "DEFAULT_CRF_MAX_PIXELS",
    "DEFAULT_NO_PROGRESS_TIMEOUT_S",
    "DEFAULT_TILE_OVERLAP",
    "NETWORK_MODES",
    "CRFConfig",
    "ConfigError",
    "DecodeConfig",
    "InputConfig",
    "ModelConfig",
    "NetworkConfig",
    "OutputConfig",
    "RayConfig",
    "ReadConfig",
    "SegmentConfig",
    "TrainingConfig",
    "WriteConfig",
    "from_mapping",
    "load_config",
    "override",
    "to_dict",
]
