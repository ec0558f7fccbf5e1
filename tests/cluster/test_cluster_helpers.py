"""``pipeline.cluster`` without a cluster: runtime env, entrypoint, address, token lookup, exit codes."""

from __future__ import annotations

import shlex

import pytest

from jobs.cli import COMMANDS
from pipeline.cluster import (
    EXIT_FAILED,
    EXIT_STILL_RUNNING,
    EXIT_STOPPED,
    EXIT_SUCCEEDED,
    WORKING_DIR_EXCLUDES,
    ClusterError,
    auth_headers,
    build_entrypoint,
    build_runtime_env,
    describe_runtime_env,
    exit_code_for,
    find_auth_token,
    load_runtime_env_file,
    normalize_address,
    parse_env_assignments,
    project_root,
)


def test_entrypoint_wraps_a_subcommand_so_it_runs_without_an_installed_package():
    entrypoint = build_entrypoint(["segment", "--input", "s3://b/my images/", "--output", "s3://b/out/"], commands=COMMANDS)
    assert shlex.split(entrypoint) == ["python", "-m", "jobs.cli", "segment", "--input", "s3://b/my images/",
                                       "--output", "s3://b/out/"]


def test_entrypoint_rejects_unknown_subcommands_and_submit_itself():
    with pytest.raises(ClusterError, match="segmnet"):
        build_entrypoint(["segmnet"], commands=COMMANDS)
    with pytest.raises(ClusterError, match="'submit'"):
        build_entrypoint(["submit", "--", "segment"], commands=COMMANDS)
    with pytest.raises(ClusterError, match="expected a subcommand"):
        build_entrypoint([], commands=COMMANDS)
    assert build_entrypoint(["python", "-c", "print(1)"], commands=COMMANDS, raw=True) == "python -c 'print(1)'"


def test_runtime_env_carries_the_checkout_minus_the_excludes(tmp_path):
    env = build_runtime_env(working_dir=project_root(), env_vars={"A": "1"})
    assert env["working_dir"] == str(project_root())
    assert {".git", ".venv", "out", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"] == {"A": "1"} and "pip" not in env  # no dependency install unless asked


def test_runtime_env_file_merges_with_the_command_line(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("env_vars: {A: from-file, B: kept}\npip: [requests]\nexcludes: [data/]\n")
    env = build_runtime_env(base=load_runtime_env_file(path), working_dir=tmp_path,
                            env_vars={"A": "from-flag"}, pip=["rich"])
    assert env["env_vars"] == {"A": "from-flag", "B": "kept"}
    assert env["pip"] == ["requests", "rich"]
    assert env["excludes"][0] == "data/" and set(WORKING_DIR_EXCLUDES) <= set(env["excludes"])
    mapping = build_runtime_env(base={"pip": {"packages": ["x"], "pip_check": False}}, pip=["y"])
    assert mapping["pip"] == {"packages": ["x", "y"], "pip_check": False}


def test_runtime_env_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("pipp: [x]\n")
    with pytest.raises(ClusterError, match=r"env\.yaml: unknown key\(s\) \['pipp'\]"):
        load_runtime_env_file(path)
    path.write_text("- a\n")
    with pytest.raises(ClusterError, match="expected a mapping, got list"):
        load_runtime_env_file(path)
    with pytest.raises(ClusterError, match="cannot read"):
        load_runtime_env_file(tmp_path / "missing.yaml")
    with pytest.raises(ClusterError, match="--working-dir"):
        build_runtime_env(working_dir=tmp_path / "nope")


def test_env_assignments_copy_local_values_and_describe_hides_them():
    env = parse_env_assignments(["AWS_REGION", "X=1=2"], environ={"AWS_REGION": "eu-west-1"})
    assert env == {"AWS_REGION": "eu-west-1", "X": "1=2"}
    with pytest.raises(ClusterError, match="MISSING: not set"):
        parse_env_assignments(["MISSING"], environ={})
    with pytest.raises(ClusterError, match="expected NAME"):
        parse_env_assignments(["1BAD=x"], environ={})
    line = describe_runtime_env({"env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}})
    assert "AWS_SECRET_ACCESS_KEY" in line and "s3cr3t-value" not in line


def test_address_normalisation():
    assert normalize_address("10.0.0.1:8265/") == "http://10.0.0.1:8265"
    assert normalize_address("https://ray.example.com") == "https://ray.example.com"
    with pytest.raises(ClusterError, match="not the Ray client port"):
        normalize_address("ray://head:10001")


def test_token_lookup_follows_ray_and_never_shows_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_auth_token(environ={}) is None
    assert find_auth_token(environ={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"}) is None
    token = find_auth_token(environ={"RAY_AUTH_TOKEN": " abc123 "})
    assert token.value == "abc123" and "abc123" not in repr(token) and "abc123" not in str(token)
    assert auth_headers(token) == {"Authorization": "Bearer abc123"} and auth_headers(None) == {}

    token_file = tmp_path / "tok"
    token_file.write_text("from-path\n")
    assert find_auth_token(environ={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}).value \
        == "from-path"
    with pytest.raises(ClusterError, match="no token found"):
        find_auth_token(environ={"RAY_AUTH_MODE": "token"})
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home")
    assert find_auth_token(environ={"RAY_AUTH_MODE": "token"}).value == "from-home"
    # an explicit file wins over everything
    assert find_auth_token(token_file=token_file, environ={"RAY_AUTH_TOKEN": "x"}).value == "from-path"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="is empty"):
        find_auth_token(token_file=tmp_path / "empty")


def test_exit_codes_follow_the_job_status():
    from ray.job_submission import JobStatus

    assert exit_code_for(JobStatus.SUCCEEDED) == EXIT_SUCCEEDED == 0
    assert exit_code_for("FAILED") == EXIT_FAILED != 0
    assert exit_code_for(JobStatus.STOPPED) == EXIT_STOPPED != 0
    assert exit_code_for("RUNNING") == EXIT_STILL_RUNNING


def test_submit_cli_rejects_bad_input_before_contacting_a_cluster(capsys):
    from jobs.cli import main

    # nothing listens on port 9: the errors below must come before any connection attempt
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "segmnet"]) == 4
    assert "segmnet" in capsys.readouterr().err
    assert main(["submit", "--address", "ray://x:10001", "--", "segment"]) == 4
    assert "Ray client port" in capsys.readouterr().err
    assert main(["submit", "--working-dir", ".", "--no-working-dir", "--", "segment"]) == 4
    assert "at most one" in capsys.readouterr().err
