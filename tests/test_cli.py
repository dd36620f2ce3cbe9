"""The command line as users run it: `model-proxy check|run` and `python -m proxy`, as real
subprocesses, with their exit codes, stdout and stderr."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.cli import main
from proxy.config import DockerServer, HealthChecks, ProxySettings, Transport

from .conftest import ROOT, RunningProxy, free_port, write_config

CONSOLE_SCRIPT = Path(sys.executable).with_name("model-proxy")

# Baseten's vLLM example (docs: "Deploy custom servers from Docker images"), unchanged but
# for the proxy: section that points secrets_dir at the test's directory.
VLLM_CONFIG = """\
base_image:
  image: vllm/vllm-openai:latest
docker_server:
  start_command: sh -c "HF_TOKEN=$(cat /secrets/hf_access_token) vllm serve meta-llama/Meta-Llama-3.1-8B-Instruct --port 8000 --max-model-len 1024"
  readiness_endpoint: /health
  liveness_endpoint: /health
  predict_endpoint: /v1/chat/completions
  server_port: 8000
resources:
  accelerator: L4
  use_gpu: true
model_name: vllm-model-server
secrets:
  hf_access_token: null
runtime:
  predict_concurrency: 128
proxy:
  secrets_dir: {secrets_dir}
"""  # noqa: E501 -- the start_command is quoted as Baseten's page has it

# Baseten's Infinity example (the same page), unchanged: it sets a token to null under
# environment_variables, which sets nothing
INFINITY_CONFIG = """\
base_image:
  image: python:3.11-slim
docker_server:
  start_command: sh -c "infinity_emb v2 --model-id BAAI/bge-small-en-v1.5"
  readiness_endpoint: /health
  liveness_endpoint: /health
  predict_endpoint: /embeddings
  server_port: 7997
resources:
  accelerator: L4
  use_gpu: true
model_name: infinity-embedding-server
requirements:
  - infinity-emb[all]
environment_variables:
  hf_access_token: null
"""

SECRET_VALUE = "hf_do_not_print_me"
BUILT_ELSEWHERE = "it shapes the image Truss builds; model-proxy runs in an image already built"
HARDWARE = "the hardware Baseten schedules the model on; here the container's limits apply"


def cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS`, run to completion."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=env if env is not None else environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`main(ARGS)` in this process, for the cases where the process itself is not the point."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MODEL_PROXY_CONFIG"}
    return {**env, **overrides}


def vllm_config(directory: Path) -> Path:
    (directory / "hf_access_token").write_text(SECRET_VALUE + "\n")
    path = directory / "config.yaml"
    path.write_text(VLLM_CONFIG.format(secrets_dir=directory))
    return path


def problems(stderr: str) -> dict[str, str]:
    """The `dotted.path: what` lines of a configuration report, by path."""
    found = {}
    for line in stderr.splitlines():
        match = re.match(r"^\s+(\S+): (.+)$", line)
        if match:
            found[match[1]] = match[2]
    return found


def test_check_prints_every_resolved_setting_of_a_truss_config(tmp_path: Path) -> None:
    result = cli("check", "--config", str(vllm_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    # a line for each Truss key that does nothing here, and nothing else
    assert result.stderr.splitlines() == [
        f"note: base_image: no effect in model-proxy ({BUILT_ELSEWHERE})",
        f"note: resources: no effect in model-proxy ({HARDWARE})",
    ]
    assert SECRET_VALUE not in result.stdout
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    expected = {
        "model_name": "vllm-model-server",
        "docker_server": {
            "start_command": (
                'sh -c "HF_TOKEN=$(cat /secrets/hf_access_token) vllm serve'
                ' meta-llama/Meta-Llama-3.1-8B-Instruct --port 8000 --max-model-len 1024"'
            ),
            "server_port": 8000,
            "predict_endpoint": "/v1/chat/completions",
            "readiness_endpoint": "/health",
            "liveness_endpoint": "/health",
            "run_as_user_id": None,
        },
        "runtime": {
            "predict_concurrency": 128,
            "health_checks": {
                "startup_threshold_seconds": 1800,
                "stop_traffic_threshold_seconds": 60,
                "restart_threshold_seconds": 90,
            },
            "transport": {
                "kind": "http",
                "ping_interval_seconds": None,
                "ping_timeout_seconds": None,
            },
        },
        "environment_variables": {},
        "secrets": ["hf_access_token"],
        "proxy": {
            "host": "0.0.0.0",
            "port": 8080,
            "max_queue_size": 1280,
            "queue_timeout_seconds": None,
            "request_timeout_seconds": None,
            "max_request_body_bytes": 104857600,
            "probe_interval_seconds": 1,
            "drain_quiet_seconds": 3,
            "shutdown_grace_seconds": 30,
            "child_stop_grace_seconds": 10,
            "restart_policy": "always",
            "secrets_dir": str(tmp_path),
            "api_key_secret": None,
            "log_format": "text",
        },
    }
    # every setting is there (the sections' fields, whatever is added later), and those
    # known here have the values this file and the defaults give them
    sections = {
        "docker_server": (resolved["docker_server"], DockerServer),
        "runtime.health_checks": (resolved["runtime"]["health_checks"], HealthChecks),
        "runtime.transport": (resolved["runtime"]["transport"], Transport),
        "proxy": (resolved["proxy"], ProxySettings),
    }
    for name, (section, settings) in sections.items():
        assert set(section) == {field.name for field in fields(settings)}, name
    assert resolved["runtime"].keys() == {"predict_concurrency", "health_checks", "transport"}
    assert expected["proxy"].items() <= resolved["proxy"].items()
    assert {**expected, "proxy": None} == {**resolved, "proxy": None}


def test_check_passes_basetens_infinity_example_saying_the_null_variable_is_not_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(INFINITY_CONFIG)

    result = cli("check", "--config", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"note: base_image: no effect in model-proxy ({BUILT_ELSEWHERE})",
        f"note: resources: no effect in model-proxy ({HARDWARE})",
        f"note: requirements: no effect in model-proxy ({BUILT_ELSEWHERE})",
        "note: environment_variables.hf_access_token: null, so not set (a secret belongs under"
        " secrets:, as a file in proxy.secrets_dir)",
    ]
    resolved = yaml.safe_load(result.stdout)
    assert resolved["environment_variables"] == {}
    assert resolved["docker_server"]["server_port"] == 7997


def test_check_on_basetens_vllm_example_without_its_secret_names_the_file_and_the_fix(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    # the page's config exactly: secrets_dir is the default /secrets, where no token lies here
    path.write_text(VLLM_CONFIG.split("proxy:")[0])
    assert not Path("/secrets/hf_access_token").exists()

    result = cli("check", "--config", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    assert problems(result.stderr) == {
        "secrets.hf_access_token": "secret file /secrets/hf_access_token is missing (create it,"
        " set proxy.secrets_dir to the directory that holds it, or remove the key)"
    }


def test_check_refuses_typos_in_truss_sections_with_a_suggestion(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        extra={
            "runtim": {"predict_concurrency": 8},
            "docker_server": {
                "start_command": "true",
                "server_port": 8000,
                "predict_endpoint": "/predict",
                "readyness_endpoint": "/health",
            },
        },
    )

    result = cli("check", "--config", str(path))

    assert result.returncode == 2
    assert problems(result.stderr) == {
        "runtim": 'unknown key; did you mean runtime? (got {"predict_concurrency": 8})',
        "docker_server.readyness_endpoint": "unknown key; did you mean readiness_endpoint?"
        ' (got "/health")',
    }


def test_check_lists_every_problem_with_its_dotted_path(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "docker_server": {"server_port": "80a", "predict_endpoint": "v1/chat"},
                "runtime": {
                    "predict_concurrency": 0,
                    "health_checks": {"startup_threshold_seconds": -1},
                },
                "secrets": {"hf_access_token": None},
                "proxy": {
                    "port": 70000,
                    "restart_policy": "sometimes",
                    "drain_quiet_secs": 1,
                    "secrets_dir": str(tmp_path),
                },
            }
        )
    )
    result = in_process("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(path) in result.stderr.splitlines()[0]
    found = problems(result.stderr)
    assert set(found) == {
        "docker_server.start_command",
        "docker_server.server_port",
        "docker_server.predict_endpoint",
        "runtime.predict_concurrency",
        "runtime.health_checks.startup_threshold_seconds",
        "secrets.hf_access_token",
        "proxy.port",
        "proxy.restart_policy",
        "proxy.drain_quiet_secs",
    }
    assert found["docker_server.start_command"] == "required"
    assert found["docker_server.server_port"].endswith('(got "80a")')
    assert found["docker_server.predict_endpoint"].endswith('(got "v1/chat")')
    assert found["runtime.predict_concurrency"].endswith("(got 0)")
    assert found["runtime.health_checks.startup_threshold_seconds"].endswith("(got -1)")
    assert found["proxy.port"].endswith("(got 70000)")
    assert found["proxy.restart_policy"].endswith('(got "sometimes")')
    assert "drain_quiet_seconds" in found["proxy.drain_quiet_secs"]
    assert "missing" in found["secrets.hf_access_token"]


def test_a_missing_file_is_exit_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    for command in ("check", "run"):
        result = in_process(command, "--config", str(missing))
        assert result.returncode == 2
        assert result.stdout == ""
        assert f"{missing}: no such file" in result.stderr


def test_a_yaml_syntax_error_is_exit_2_naming_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model_name: x\ndocker_server:\n  start_command: [unclosed\n  server_port: 1\n")
    result = in_process("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.search(rf"{re.escape(str(path))}:4:\d+: invalid YAML", result.stderr), result.stderr


def test_run_with_a_bad_config_exits_2_before_starting_anything(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    port = free_port()
    path = write_config(
        tmp_path,
        server_port=port,
        start_command=f"touch {marker}",
        proxy={"port": port, "log_format": "loud"},
    )
    result = cli("run", "--config", str(path))
    assert result.returncode == 2
    found = problems(result.stderr)
    assert set(found) == {"proxy.port", "proxy.log_format"}
    assert "listening" not in result.stderr
    assert not marker.exists()


def test_config_defaults_to_the_environment_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = write_config(tmp_path, extra={"model_name": "from-cwd"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chosen = write_config(elsewhere, extra={"model_name": "from-env"})

    def model_name(result: subprocess.CompletedProcess[str]) -> str:
        assert result.returncode == 0, result.stderr
        name: str = yaml.safe_load(result.stdout)["model_name"]
        return name

    monkeypatch.delenv("MODEL_PROXY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert model_name(in_process("check")) == "from-cwd"
    # the real program too, where the default is computed at startup
    assert model_name(cli("check", cwd=tmp_path)) == "from-cwd"

    monkeypatch.setenv("MODEL_PROXY_CONFIG", str(chosen))
    assert model_name(in_process("check")) == "from-env"
    assert model_name(in_process("check", "--config", str(here))) == "from-cwd"
    monkeypatch.setenv("MODEL_PROXY_CONFIG", "nope.yaml")
    result = in_process("check")
    assert result.returncode == 2
    assert "nope.yaml: no such file" in result.stderr

    monkeypatch.delenv("MODEL_PROXY_CONFIG")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    result = in_process("check")
    assert result.returncode == 2
    assert "config.yaml: no such file (pass --config PATH or set MODEL_PROXY_CONFIG)" in (
        result.stderr
    )


def test_the_console_script_and_python_m_proxy_are_the_same_program(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    via_module = cli("check", "--config", str(path))
    via_script = subprocess.run(
        [str(CONSOLE_SCRIPT), "check", "--config", str(path)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert via_module.returncode == via_script.returncode == 0
    assert via_script.stdout == via_module.stdout
    assert yaml.safe_load(via_script.stdout)["model_name"] == "test-model"


@pytest.mark.parametrize("args", [[], ["serve"], ["check", "--bogus"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = in_process(*args)
    assert result.returncode == 2
    assert "usage: model-proxy" in result.stderr


def test_model_proxy_alone_prints_the_help() -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT)], env=environment(), capture_output=True, text=True, check=False
    )

    assert result.returncode == 2  # argparse's code for a command line that does nothing
    assert result.stderr == cli("--help").stdout
    for command in ("run", "check", "presets", "--version"):
        assert re.search(rf"^\s+{command}\b", result.stderr, re.MULTILINE), command


def test_version_prints_the_installed_version_and_build() -> None:
    """The build is the one CI asked for: .ci/compiled builds with MODEL_PROXY_COMPILE=1."""
    result = cli("--version")

    build = "compiled with mypyc" if os.environ.get("MODEL_PROXY_COMPILE") == "1" else "pure Python"
    assert result.returncode == 0
    assert result.stdout == f"model-proxy {metadata.version('model-proxy')} ({build})\n"


async def test_run_port_and_host_override_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, proxy={"host": "0.0.0.0"})
    file_port = yaml.safe_load(path.read_text())["proxy"]["port"]
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "run",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=environment(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    proxy = RunningProxy(process, port)
    try:
        await proxy.wait_for_log(rf"listening on 127\.0\.0\.1:{port}\b")
        await proxy.wait_for_log("the model server is ready")
        async with aiohttp.ClientSession() as session, asyncio.timeout(5):
            async with session.get(proxy.url + "/ready") as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{file_port}/ready")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_run_exits_1_without_starting_the_model_server_when_its_port_is_taken(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "started"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, start_command=f"touch {marker}", proxy={"port": port})
        result = cli("run", "--config", str(path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not marker.exists()
