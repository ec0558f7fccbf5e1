"""Token authentication on: a head started with ``RAY_AUTH_MODE=token``; submit with and without the token."""

from __future__ import annotations

import secrets

import pytest

from pipeline.cluster import EXIT_NOT_SUBMITTED, EXIT_SUCCEEDED
from tests.cluster.conftest import run_submit
from tests.cluster.local_cluster import LocalRayCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def auth_cluster():
    cluster = LocalRayCluster(auth_token=secrets.token_hex(16))
    try:
        cluster.start_head(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def _client_env(cluster: LocalRayCluster, **overrides: str) -> dict[str, str]:
    env = cluster.env(auth=False)
    env.pop("RAY_AUTH_MODE")
    env.update(overrides)
    return env


def test_token_from_environment_is_sent(auth_cluster):
    env = _client_env(auth_cluster, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_cluster.auth_token)
    # with the working dir: the package upload goes through the authenticated API too
    result = run_submit(auth_cluster, ["--raw", "--", "python", "-c", "import pipeline.cluster; print('authed-ok')"],
                        env=env)
    assert result.returncode == EXIT_SUCCEEDED, result.output
    assert "authed-ok" in result.stdout
    assert "token from RAY_AUTH_TOKEN" in result.stderr
    assert auth_cluster.auth_token not in result.output


def test_token_file_is_sent(auth_cluster, tmp_path):
    token_file = tmp_path / "cluster.token"
    token_file.write_text(auth_cluster.auth_token + "\n")
    result = run_submit(auth_cluster, ["--auth-token-file", str(token_file), "--no-working-dir", "--raw", "--",
                                       "python", "-c", "print('file-ok')"], env=_client_env(auth_cluster))
    assert result.returncode == EXIT_SUCCEEDED, result.output
    assert "file-ok" in result.stdout
    assert auth_cluster.auth_token not in result.output


def test_without_token_fails_clearly(auth_cluster):
    result = run_submit(auth_cluster, ["--no-working-dir", "--raw", "--", "true"],
                        env=_client_env(auth_cluster, RAY_AUTH_MODE="disabled"))
    assert result.returncode == EXIT_NOT_SUBMITTED, result.output
    assert "authentication failed" in result.stderr
    assert "no token was sent" in result.stderr and "RAY_AUTH_MODE=token" in result.stderr


def test_wrong_token_fails_clearly(auth_cluster):
    wrong = secrets.token_hex(16)
    result = run_submit(auth_cluster, ["--no-working-dir", "--raw", "--", "true"],
                        env=_client_env(auth_cluster, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=wrong))
    assert result.returncode == EXIT_NOT_SUBMITTED, result.output
    assert "was rejected" in result.stderr
    assert wrong not in result.output and auth_cluster.auth_token not in result.output
