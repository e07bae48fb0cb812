"""The `sandbox-env` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

_EXE = shutil.which("sandbox-env")
CLI = [_EXE] if _EXE else [sys.executable, "-m", "sandbox_env.cli"]


def sandbox_env(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    out = sandbox_env("--help")
    assert out.returncode == 0
    for command in ("serve", "run", "policy", "images"):
        assert command in out.stdout


def test_policy_check_prints_a_valid_policy_as_json() -> None:
    out = sandbox_env("policy", "check", "default")
    assert out.returncode == 0, out.stderr
    policy = json.loads(out.stdout)
    assert policy["name"] == "default" and policy["timeout_s"] > 0


def test_policy_check_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('memory_mb = 1\ntimeout_s = "soon"\n')
    out = sandbox_env("policy", "check", str(bad))
    assert out.returncode == 1
    assert out.stdout == ""
    assert "memory_mb" in out.stderr and "timeout_s" in out.stderr


def test_policy_check_of_an_unknown_name_lists_the_available_ones() -> None:
    out = sandbox_env("policy", "check", "no-such-policy")
    assert out.returncode == 1
    assert "no-such-policy" in out.stderr and "default" in out.stderr


@pytest.mark.slow
async def test_serve_flags_override_environment_variables(tmp_path: Path) -> None:
    from sandbox_env import CapacityError, SandboxEnv

    env = {**os.environ, "SANDBOX_ENV_MAX_SESSIONS": "1", "SANDBOX_ENV_POLICY": "strict"}
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--policy", "default",
                                 "--pool-size", "0"], env=env, stderr=sink, text=True)
    try:
        url = _wait_for_url(proc, log)
        async with SandboxEnv(url) as first:
            await first.reset()
            state = await first.state()
            with pytest.raises(CapacityError):  # max_sessions=1 came from the environment
                await SandboxEnv(url).reset()
        assert state.policy == "default"  # the flag beat SANDBOX_ENV_POLICY=strict
    finally:
        proc.terminate()  # uvicorn shuts down gracefully on SIGTERM, then re-raises it
        proc.wait(timeout=120)
    assert "Application shutdown complete" in log.read_text()


def _wait_for_url(proc: subprocess.Popen[str], log: Path) -> str:
    # --port 0 lets the OS pick; uvicorn logs the address it bound.
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://\S+)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.1)
    pytest.fail(f"sandbox-env serve did not start (exit code {proc.poll()}):\n{log.read_text()}")


def test_serve_rejects_an_invalid_flag_value_before_starting() -> None:
    out = sandbox_env("serve", "--max-sessions", "0")
    assert out.returncode == 2
    assert "max_sessions" in out.stderr


def test_serve_refuses_a_backend_that_is_not_a_sandbox() -> None:
    for args, env in [(["--backend", "fake"], {}), ([], {"SANDBOX_ENV_BACKEND": "fake"})]:
        out = subprocess.run([*CLI, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert out.returncode == 2, out.stderr
        assert "not a sandbox" in out.stderr and "--allow-unisolated" in out.stderr


def test_run_on_the_fake_backend_runs_in_process() -> None:
    out = sandbox_env("run", "--backend", "fake", "-", stdin="print(6 * 7)\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["observation"]["stdout"] == "42\n"


@pytest.mark.slow
def test_run_a_file_prints_the_wire_observation(tmp_path: Path) -> None:
    pytest.importorskip("sandbox_env.kernels.jupyter.kernel", reason="the jupyter backend is not written yet")
    script = tmp_path / "snippet.py"
    script.write_text("x = 6 * 7\nprint(x)\n")
    out = sandbox_env("run", str(script))
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["observation"]["stdout"] == "42\n"
    assert set(payload["observation"]) == {"stdout", "stderr", "exit_code", "metadata"}
    assert payload["observation"]["metadata"]["execution"]["status"] == "ok"
    assert payload["done"] is False


@pytest.mark.slow
def test_run_from_stdin_exits_1_when_the_code_raises() -> None:
    pytest.importorskip("sandbox_env.kernels.jupyter.kernel", reason="the jupyter backend is not written yet")
    out = sandbox_env("run", "-", stdin="raise ValueError('boom')\n")
    assert out.returncode == 1, out.stderr
    payload = json.loads(out.stdout)
    execution = payload["observation"]["metadata"]["execution"]
    assert execution["status"] == "error"
    assert execution["exception"]["type"] == "ValueError"
    assert "boom" in execution["exception"]["message"]


@pytest.mark.slow
def test_run_with_a_timeout_reports_the_timeout_status() -> None:
    pytest.importorskip("sandbox_env.kernels.jupyter.kernel", reason="the jupyter backend is not written yet")
    out = sandbox_env("run", "-", "--timeout", "1", stdin="while True:\n    pass\n")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["observation"]["metadata"]["execution"]["status"] == "timeout"


def test_run_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    out = sandbox_env("run", str(tmp_path / "missing.py"))
    assert out.returncode == 2
    assert "missing.py" in out.stderr


def test_farm_init_writes_a_private_token_once(tmp_path: Path) -> None:
    env_file = tmp_path / "farm.env"
    out = subprocess.run([*CLI, "farm", "init", "--env-file", str(env_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert env_file.stat().st_mode & 0o777 == 0o600
    tokens = re.findall(r"^SANDBOX_ENV_TOKEN=([0-9a-f]{48})$", env_file.read_text(), re.M)
    assert len(tokens) == 1
    again = subprocess.run([*CLI, "farm", "init", "--env-file", str(env_file)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    assert re.findall(r"^SANDBOX_ENV_TOKEN=(\w+)$", env_file.read_text(), re.M) == tokens  # kept
    env_file.chmod(0o644)  # --force over a readable file, or over a symlink, writes a private file
    forced = subprocess.run([*CLI, "farm", "init", "--env-file", str(env_file), "--force"], capture_output=True,
                            text=True, timeout=60)
    assert forced.returncode == 0 and env_file.stat().st_mode & 0o777 == 0o600, forced.stderr
    target, link = tmp_path / "elsewhere", tmp_path / "linked.env"
    link.symlink_to(target)
    linked = subprocess.run([*CLI, "farm", "init", "--env-file", str(link), "--force"], capture_output=True,
                            text=True, timeout=60)
    assert linked.returncode == 0 and not target.exists() and not link.is_symlink(), linked.stderr
    assert link.stat().st_mode & 0o777 == 0o600


def test_farm_status_of_a_lone_server_lists_one_replica(live_server_factory) -> None:
    server = live_server_factory(backend="fake", max_sessions=5)
    out = subprocess.run([*CLI, "farm", "status", server.url, "--json"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SANDBOX_ENV_TOKEN": server.token})
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["capacity"] == 5
    assert [(r["replica"], r["status"], r["capacity"]) for r in status["replicas"]] == [("local", "ready", 5)]
    refused = subprocess.run([*CLI, "farm", "status", server.url], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SANDBOX_ENV_TOKEN": "not-the-token-of-this-server"})
    assert refused.returncode == 2 and "401" in refused.stderr
