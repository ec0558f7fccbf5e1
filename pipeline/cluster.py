"""Submitting jobs to a Ray cluster through the Jobs API (the dashboard, port 8265).

Pure helpers (runtime environment, entrypoint, authentication headers, exit
codes) plus :func:`follow_job`, which streams a job's logs until it ends. The
``deeplab-batch submit`` job (``jobs/submit.py``) is a thin layer over these.

How the project reaches the cluster: the repository root travels as the job's
``working_dir`` (minus :data:`WORKING_DIR_EXCLUDES`); Ray makes it the driver's
and every worker's current directory and puts it first on ``PYTHONPATH``, so
``python -m jobs.cli ...`` imports the submitted code even where the package is
not installed, and wins over an installed copy where it is (the container
image). Dependencies are *not* installed by default: the image already has
them. ``pip`` in the runtime environment is opt-in; Ray builds that virtualenv
on top of the cluster's site-packages, so torch is not reinstalled unless a pin
asks for a different version.

Token authentication (Ray >= 2.52; on by default for local clusters): the
dashboard wants ``Authorization: Bearer <token>``. :func:`auth_headers` finds
the token where Ray itself looks (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``) or in an explicit file. The token is never printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

DEFAULT_DASHBOARD_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns, relative to the working directory (Ray's `excludes`).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "venv",
    "out",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
    ".cache",
)

# Custom resources that pin each stage to its node kind. A node advertises as many
# slots as it can hold actors of its stage (``ray start --resources``, KubeRay's group
# ``resources``, the launcher's node ``resources``): ``gpu_node`` = its GPUs,
# ``crf_node`` = its CRF actors; a stage asks for one slot per actor (the segment
# config's ``crf.resources: {crf_node: 1}``).
GPU_NODE_RESOURCE = "gpu_node"
CRF_NODE_RESOURCE = "crf_node"

# Keys Ray accepts in a runtime environment that this project uses or documents.
RUNTIME_ENV_KEYS: frozenset[str] = frozenset(
    {"working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars",
     "container", "image_uri", "config", "py_executable", "java_jars", "nsight", "mpi"}
)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")

# Exit codes of ``deeplab-batch submit`` (2 is argparse's usage error).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_STOPPED = 3
EXIT_NOT_SUBMITTED = 4  # connection, authentication or runtime-env error before the job ran
EXIT_STILL_RUNNING = 5  # --timeout reached while waiting; the job goes on
EXIT_INTERRUPTED = 130

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """A problem found before or while submitting (names the file, flag or setting)."""


# ---------------------------------------------------------------------------- runtime env


def project_root() -> Path:
    """The checkout this module was imported from (the default working directory)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "jobs").is_dir():
        raise ClusterError(
            f"project root: expected {root} to hold pyproject.toml and jobs/ (a source checkout); "
            "pass --working-dir DIR, or --no-working-dir when the cluster's image has the project"
        )
    return root


def load_runtime_env_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A runtime environment from a YAML or JSON file (a mapping of Ray's runtime_env keys)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterError(f"--runtime-env {path}: cannot read it ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ClusterError(f"--runtime-env {path}: not valid YAML/JSON ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClusterError(f"--runtime-env {path}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - RUNTIME_ENV_KEYS)
    if unknown:
        raise ClusterError(
            f"--runtime-env {path}: unknown key(s) {unknown}; expected some of {sorted(RUNTIME_ENV_KEYS)}"
        )
    env_vars = data.get("env_vars", {})
    if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
        raise ClusterError(f"--runtime-env {path}: env_vars: expected a mapping of strings, got {env_vars!r}")
    return data


def parse_env_assignments(items: Iterable[str], *, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``NAME=VALUE`` as given, or ``NAME`` copied from the local environment."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ClusterError(f"--env {item.split('=')[0]!r}: expected NAME or NAME=VALUE with NAME like AWS_REGION")
        if not sep:
            if name not in environ:
                raise ClusterError(f"--env {name}: not set in the local environment (use {name}=VALUE)")
            value = environ[name]
        env[name] = value
    return env


def build_runtime_env(
    *,
    base: Mapping[str, Any] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    excludes: Sequence[str] = WORKING_DIR_EXCLUDES,
    env_vars: Mapping[str, str] | None = None,
    pip: Sequence[str] = (),
) -> dict[str, Any]:
    """Merge a runtime-env file (``base``) with the command line's working dir, env vars and pip.

    The command line wins for ``working_dir``; ``excludes``, ``env_vars`` and ``pip``
    are combined (the command line's env vars override the file's).
    """
    env: dict[str, Any] = {k: v for k, v in (base or {}).items()}
    if working_dir is not None:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise ClusterError(f"--working-dir {working_dir}: expected a directory, got nothing there")
        env["working_dir"] = str(path)
    if "working_dir" in env and not str(env["working_dir"]).startswith(("s3://", "gs://", "https://")):
        merged = list(env.get("excludes", []))
        merged += [p for p in excludes if p not in merged]
        env["excludes"] = merged
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    if pip:
        current = env.get("pip", [])
        if isinstance(current, dict):  # {"packages": [...], "pip_check": ...}
            env["pip"] = {**current, "packages": [*current.get("packages", []), *pip]}
        elif isinstance(current, list):
            env["pip"] = [*current, *pip]
        else:
            raise ClusterError(
                f"runtime env pip: expected a list or a mapping to add {list(pip)} to, got {current!r} "
                "(a requirements file path cannot be combined with --pip)"
            )
    return env


def describe_runtime_env(env: Mapping[str, Any]) -> str:
    """One line for the console: env var *names* only (their values may be credentials)."""
    parts = []
    if "working_dir" in env:
        parts.append(f"working_dir={env['working_dir']}")
    if "py_modules" in env:
        parts.append(f"py_modules={env['py_modules']}")
    if env.get("pip"):
        parts.append(f"pip={env['pip']}")
    if env.get("env_vars"):
        parts.append(f"env_vars={sorted(env['env_vars'])}")
    others = sorted(set(env) - {"working_dir", "py_modules", "pip", "env_vars", "excludes"})
    if others:
        parts.append(f"other keys={others}")
    return ", ".join(parts) or "(empty: the cluster's own environment)"


# ---------------------------------------------------------------------------- entrypoint


def build_entrypoint(
    command: Sequence[str], *, commands: Collection[str], python: str = "python", raw: bool = False
) -> str:
    """The job's shell command: ``python -m jobs.cli SUBCOMMAND ...`` (or ``command`` as is).

    ``commands``: the subcommands the CLI has (``jobs.cli.COMMANDS``); ``submit`` is refused.
    """
    known = list(commands)
    command = list(command)
    if not command:
        raise ClusterError("command: expected a subcommand after '--', e.g. -- segment --input URI --output URI")
    if raw:
        return shlex.join(command)
    name = command[0]
    if name not in known or name == "submit":
        choices = ", ".join(c for c in known if c != "submit")
        raise ClusterError(
            f"command: expected a deeplab-batch subcommand ({choices}), got {name!r}; "
            "pass --raw to run an arbitrary command"
        )
    return shlex.join([python, "-m", "jobs.cli", *command])


# ---------------------------------------------------------------------------- address, auth


def normalize_address(address: str) -> str:
    """``HOST:PORT`` -> ``http://HOST:PORT``; the Jobs API speaks HTTP(S) to the dashboard."""
    address = address.strip().rstrip("/")
    if not address:
        raise ClusterError("--address: expected the dashboard URL, e.g. http://HEAD:8265, got ''")
    if address.startswith("ray://"):
        raise ClusterError(
            f"--address {address}: the Jobs API talks to the dashboard (http://HEAD:8265), not the Ray client port"
        )
    if "://" not in address:
        address = "http://" + address
    return address


def default_address(environ: Mapping[str, str] = os.environ) -> str:
    """``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``, else the local dashboard."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_DASHBOARD_ADDRESS


@dataclass(frozen=True)
class AuthToken:
    """A bearer token and where it came from (``repr`` hides the value)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"AuthToken(source={self.source!r}, value=<hidden>)"

    __str__ = __repr__


def _read_token(path: Path, *, source: str) -> AuthToken:
    try:
        value = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ClusterError(f"{source}: cannot read the token file {path} ({exc.strerror})") from exc
    if not value:
        raise ClusterError(f"{source}: the token file {path} is empty")
    return AuthToken(value=value, source=f"{source} ({path})")


def find_auth_token(*, token_file: str | os.PathLike[str] | None = None,
                    environ: Mapping[str, str] = os.environ) -> AuthToken | None:
    """The token to send, or None when authentication is off.

    An explicit ``token_file`` always wins. Otherwise a token is sent when
    ``RAY_AUTH_MODE=token`` or ``RAY_AUTH_TOKEN`` is set, looked up as Ray does:
    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``. ``RAY_AUTH_MODE=disabled`` sends nothing.
    """
    if token_file is not None:
        return _read_token(Path(token_file), source="--auth-token-file")
    mode = environ.get(AUTH_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return None
    if environ.get(AUTH_TOKEN_ENV, "").strip():
        return AuthToken(value=environ[AUTH_TOKEN_ENV].strip(), source=AUTH_TOKEN_ENV)
    if mode != "token":
        return None
    if environ.get(AUTH_TOKEN_PATH_ENV):
        return _read_token(Path(environ[AUTH_TOKEN_PATH_ENV]), source=AUTH_TOKEN_PATH_ENV)
    default = DEFAULT_TOKEN_PATH.expanduser()
    if default.is_file():
        return _read_token(default, source="default token file")
    raise ClusterError(
        f"{AUTH_MODE_ENV}=token but no token found: set {AUTH_TOKEN_ENV}, or {AUTH_TOKEN_PATH_ENV}=FILE, "
        f"or write {DEFAULT_TOKEN_PATH} (`ray get-auth-token` on the head prints it), or pass --auth-token-file"
    )


def auth_headers(token: AuthToken | None) -> dict[str, str]:
    """HTTP headers for the dashboard (empty without a token)."""
    return {"Authorization": f"Bearer {token.value}"} if token else {}


def explain_connection_error(exc: BaseException, *, address: str, token: AuthToken | None) -> str:
    """A message that says what to do, for errors raised before the job was accepted."""
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        if token is None:
            hint = (f"the cluster requires token authentication and no token was sent: set {AUTH_MODE_ENV}=token "
                    f"with {AUTH_TOKEN_ENV} / {AUTH_TOKEN_PATH_ENV} / {DEFAULT_TOKEN_PATH}, or pass --auth-token-file")
        else:
            hint = f"the token from {token.source} was rejected: it does not match the cluster's token"
        return f"authentication failed at {address}: {hint}"
    return f"could not submit to {address}: {exc}"


# ---------------------------------------------------------------------------- exit codes, following


def exit_code_for(status: str) -> int:
    """The process exit code for a job status (``JobStatus`` or its string value)."""
    status = str(getattr(status, "value", status))
    return {"SUCCEEDED": EXIT_SUCCEEDED, "FAILED": EXIT_FAILED, "STOPPED": EXIT_STOPPED}.get(
        status, EXIT_STILL_RUNNING
    )


def log_tail(text: str, *, lines: int = 30) -> str:
    """The last ``lines`` lines of a log."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


async def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow_job(client: Any, job_id: str, *, out: TextIO = sys.stdout, stream: bool = True,
               timeout_s: float | None = None, poll_interval_s: float = 1.0) -> str:
    """Stream the job's logs (``tail_job_logs``) until it ends; return its final status.

    Returns a non-terminal status (e.g. ``RUNNING``) when ``timeout_s`` passes first.
    """
    deadline = None if not timeout_s else time.monotonic() + timeout_s
    if stream:
        try:
            asyncio.run(asyncio.wait_for(_stream_logs(client, job_id, out), timeout=timeout_s or None))
        except TimeoutError:
            pass  # the status check below reports the job as still running
        except RuntimeError as exc:  # the log stream closed before the job ended
            print(f"log stream of {job_id} ended early ({exc}); polling its status", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return status
        time.sleep(poll_interval_s)
