"""Tests for proxy.config: loading, validation messages, overrides, rendering, secrets."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    Config,
    DockerServer,
    HealthChecks,
    ProxySettings,
    Transport,
    load_config,
    read_secret,
    render_config,
)
from proxy.errors import ConfigError

DELETE = object()
MISSING_HINT = (
    " (create it, set proxy.secrets_dir to the directory that holds it, or remove the key)"
)

MINIMAL: dict[str, Any] = {
    "docker_server": {
        "start_command": "python server.py",
        "server_port": 8000,
        "predict_endpoint": "/predict",
    }
}

VLLM_TRUSS = """\
model_name: Llama 3.1 8B Instruct vLLM
description: Llama 3.1 8B served by vLLM behind Baseten's docker_server
python_version: py311
base_image:
  image: vllm/vllm-openai:v0.7.3
model_metadata:
  repo_id: meta-llama/Llama-3.1-8B-Instruct
  example_model_input:
    messages:
      - role: user
        content: What is machine learning?
    stream: true
    max_tokens: 512
  tags:
    - openai-compatible
docker_server:
  start_command: sh -c "HF_TOKEN=$(cat /secrets/hf_access_token) vllm serve \
meta-llama/Llama-3.1-8B-Instruct --port 8000 --max-model-len 8192"
  readiness_endpoint: /health
  liveness_endpoint: /health
  predict_endpoint: /v1/chat/completions
  server_port: 8000
  run_as_user_id: 1000
resources:
  accelerator: H100
  use_gpu: true
  cpu: "4"
  memory: 16Gi
secrets:
  hf_access_token: null
requirements: []
system_packages: []
build_commands: []
external_package_dirs: []
environment_variables:
  VLLM_LOGGING_LEVEL: WARNING
  HF_HUB_ENABLE_HF_TRANSFER: 1
  UNSET_BY_TRUSS: null
runtime:
  predict_concurrency: 128
  streaming_read_timeout: 60
  enable_tracing_data: false
  transport:
    kind: http
  health_checks:
    restart_check_delay_seconds: null
    restart_threshold_seconds: null
    stop_traffic_threshold_seconds: null
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def with_values(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with each dotted path set to its value (DELETE removes it)."""
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def load(tmp_path: Path, data: dict[str, Any], **overrides: Any) -> Config:
    return load_config(write(tmp_path, yaml.safe_dump(data, sort_keys=False)), **overrides)


def problems(tmp_path: Path, data: dict[str, Any], **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data, **overrides)
    return caught.value.problems


def make_secret(tmp_path: Path, name: str, content: str = "s3cret\n") -> Path:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    (secrets_dir / name).write_text(content)
    return secrets_dir


def test_baseten_vllm_truss_config_loads_unchanged(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "hf_access_token")
    text = VLLM_TRUSS + f"proxy:\n  secrets_dir: {secrets_dir}\n"

    config = load_config(write(tmp_path, text))

    assert config.model_name == "Llama 3.1 8B Instruct vLLM"
    assert config.docker_server == DockerServer(
        start_command='sh -c "HF_TOKEN=$(cat /secrets/hf_access_token) vllm serve '
        'meta-llama/Llama-3.1-8B-Instruct --port 8000 --max-model-len 8192"',
        server_port=8000,
        predict_endpoint="/v1/chat/completions",
        readiness_endpoint="/health",
        liveness_endpoint="/health",
        run_as_user_id=1000,
    )
    assert config.predict_concurrency == 128
    assert config.health_checks == HealthChecks()  # Truss writes null for "the default"
    assert dict(config.environment_variables) == {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
    }
    assert config.secrets == ("hf_access_token",)
    assert config.proxy == ProxySettings(max_queue_size=1280, secrets_dir=secrets_dir)


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, with_values(MINIMAL, {"runtime.predict_concurrency": 3}))

    assert config.model_name is None
    assert config.docker_server.readiness_endpoint is None
    assert config.docker_server.liveness_endpoint is None
    assert config.health_checks == HealthChecks(
        startup_threshold_seconds=1800.0,
        stop_traffic_threshold_seconds=60.0,
        restart_threshold_seconds=90.0,
    )
    assert config.environment_variables == {}
    assert config.secrets == ()
    assert config.proxy == ProxySettings(
        host="0.0.0.0",
        port=8080,
        max_queue_size=30,
        queue_timeout_seconds=None,
        request_timeout_seconds=None,
        max_request_body_bytes=104857600,
        probe_interval_seconds=1.0,
        drain_quiet_seconds=3.0,
        shutdown_grace_seconds=30.0,
        child_stop_grace_seconds=10.0,
        restart_policy="always",
        secrets_dir=Path("/secrets"),
        api_key_secret=None,
        log_format="text",
    )


def test_predict_concurrency_defaults_to_one_like_truss(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)

    assert config.predict_concurrency == 1
    assert config.proxy.max_queue_size == 10


def test_settings_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.environment_variables["X"] = "1"  # type: ignore[index]


def test_every_setting_can_be_set(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "api_key")
    data = with_values(
        MINIMAL,
        {
            "docker_server.predict_endpoint": "/v1/completions?stream=true",
            "runtime.health_checks": {
                "startup_threshold_seconds": 0.5,
                "stop_traffic_threshold_seconds": 0,
                "restart_threshold_seconds": 2.25,
                "restart_check_delay_seconds": 5,
            },
            "proxy": {
                "host": "127.0.0.1",
                "port": 9000,
                "max_queue_size": 0,
                "queue_timeout_seconds": 0.25,
                "request_timeout_seconds": 600,
                "max_request_body_bytes": 1,
                "probe_interval_seconds": 0.1,
                "drain_quiet_seconds": 0,
                "shutdown_grace_seconds": 5.5,
                "child_stop_grace_seconds": 1,
                "restart_policy": "never",
                "secrets_dir": str(secrets_dir),
                "api_key_secret": "api_key",
                "log_format": "json",
                "log_level": "warning",
                "client_header_timeout_seconds": 1.5,
                "client_body_timeout_seconds": 2,
                "client_send_timeout_seconds": 3,
                "keepalive_timeout_seconds": 4,
                "buffer_request_body_bytes": 0,
                "websocket_idle_timeout_seconds": None,
                "grpc_upstream_port": 8081,
                "grpc_health_service": "inference",
                "upstream_metrics_endpoint": "/metrics",
            },
            "runtime.transport": {
                "kind": "websocket",
                "ping_interval_seconds": 20,
                "ping_timeout_seconds": 5.5,
            },
        },
    )

    config = load(tmp_path, data)

    assert config.docker_server.predict_endpoint == "/v1/completions?stream=true"
    assert config.health_checks == HealthChecks(
        startup_threshold_seconds=0.5,
        stop_traffic_threshold_seconds=0.0,
        restart_threshold_seconds=2.25,
    )
    assert config.proxy == ProxySettings(
        host="127.0.0.1",
        port=9000,
        max_queue_size=0,
        queue_timeout_seconds=0.25,
        request_timeout_seconds=600.0,
        max_request_body_bytes=1,
        probe_interval_seconds=0.1,
        drain_quiet_seconds=0.0,
        shutdown_grace_seconds=5.5,
        child_stop_grace_seconds=1.0,
        restart_policy="never",
        secrets_dir=secrets_dir,
        api_key_secret="api_key",
        log_format="json",
        log_level="warning",
        client_header_timeout_seconds=1.5,
        client_body_timeout_seconds=2.0,
        client_send_timeout_seconds=3.0,
        keepalive_timeout_seconds=4.0,
        buffer_request_body_bytes=0,
        websocket_idle_timeout_seconds=None,
        grpc_upstream_port=8081,
        grpc_health_service="inference",
        upstream_metrics_endpoint="/metrics",
    )
    assert config.transport == Transport(
        kind="websocket", ping_interval_seconds=20.0, ping_timeout_seconds=5.5
    )
    assert config.grpc_port == 8081
    assert isinstance(config.proxy.request_timeout_seconds, float)


def test_host_and_port_overrides_replace_the_file(tmp_path: Path) -> None:
    data = with_values(MINIMAL, {"proxy.host": "0.0.0.0", "proxy.port": 8080})

    config = load(tmp_path, data, host="127.0.0.1", port=9090)

    assert (config.proxy.host, config.proxy.port) == ("127.0.0.1", 9090)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"port": 8000},
            "proxy.port: must differ from docker_server.server_port (got 8000)",
        ),
        ({"port": 0}, "proxy.port: must be an integer between 1 and 65535 (got 0)"),
        ({"host": ""}, 'proxy.host: must be a non-empty string (got "")'),
    ],
)
def test_host_and_port_overrides_are_validated(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    assert problems(tmp_path, MINIMAL, **overrides) == [expected]


def test_a_broken_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """\
model_name: 42
docker_server:
  server_port: "80a"
  predict_endpoint: predict
  readiness_endpoint: " /health"
runtime:
  predict_concurrency: 0
  health_checks:
    restart_threshold_seconds: -1
    startup_treshold_seconds: 10
environment_variables:
  GOOD: ok
  BAD=NAME: x
  LIST: [1, 2]
secrets:
  hf_access_token: null
proxy:
  port: true
  queue_timout_seconds: 5
  max_request_body_bytes: 0
  restart_policy: sometimes
  log_format: xml
  secrets_dir: SECRETS
"""
    secrets_dir = tmp_path / "empty-secrets"
    secrets_dir.mkdir()

    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text.replace("SECRETS", str(secrets_dir))))

    assert caught.value.problems == [
        "model_name: must be a string (got 42)",
        "docker_server.start_command: required",
        'docker_server.server_port: must be an integer between 1 and 65535 (got "80a")',
        'docker_server.predict_endpoint: must start with "/" (got "predict")',
        'docker_server.readiness_endpoint: must not have surrounding spaces (got " /health")',
        "runtime.predict_concurrency: must be an integer >= 1 (got 0)",
        "runtime.health_checks.startup_treshold_seconds: unknown key;"
        " did you mean startup_threshold_seconds? (got 10)",
        "runtime.health_checks.restart_threshold_seconds: must be a number of seconds >= 0"
        " (got -1)",
        'environment_variables: names must be non-empty strings without "=" or NUL'
        ' (got "BAD=NAME")',
        "environment_variables.LIST: must be a string, number or boolean without NUL (got [1, 2])",
        "proxy.queue_timout_seconds: unknown key; did you mean queue_timeout_seconds? (got 5)",
        "proxy.port: must be an integer between 1 and 65535 (got true)",
        "proxy.max_request_body_bytes: must be an integer >= 1 (got 0)",
        'proxy.restart_policy: must be one of always, never (got "sometimes")',
        'proxy.log_format: must be one of text, json (got "xml")',
        f"secrets.hf_access_token: secret file {secrets_dir / 'hf_access_token'} is missing"
        + MISSING_HINT,
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # docker_server
        ({"docker_server": "vllm"}, 'docker_server: must be a mapping (got "vllm")'),
        ({"docker_server.start_command": DELETE}, "docker_server.start_command: required"),
        ({"docker_server.start_command": None}, "docker_server.start_command: required"),
        (
            {"docker_server.start_command": "  "},
            'docker_server.start_command: must be a non-empty string (got "  ")',
        ),
        (
            {"docker_server.start_command": ["vllm", "serve"]},
            'docker_server.start_command: must be a non-empty string (got ["vllm", "serve"])',
        ),
        ({"docker_server.server_port": DELETE}, "docker_server.server_port: required"),
        (
            {"docker_server.server_port": "8000"},
            'docker_server.server_port: must be an integer between 1 and 65535 (got "8000")',
        ),
        (
            {"docker_server.server_port": 8000.0},
            "docker_server.server_port: must be an integer between 1 and 65535 (got 8000.0)",
        ),
        (
            {"docker_server.server_port": True},
            "docker_server.server_port: must be an integer between 1 and 65535 (got true)",
        ),
        (
            {"docker_server.server_port": 65536},
            "docker_server.server_port: must be an integer between 1 and 65535 (got 65536)",
        ),
        ({"docker_server.predict_endpoint": DELETE}, "docker_server.predict_endpoint: required"),
        (
            {"docker_server.predict_endpoint": ""},
            'docker_server.predict_endpoint: must start with "/" (got "")',
        ),
        (
            {"docker_server.predict_endpoint": "/predict "},
            'docker_server.predict_endpoint: must not have surrounding spaces (got "/predict ")',
        ),
        (
            {"docker_server.predict_endpoint": "/pre dict"},
            "docker_server.predict_endpoint: must not contain spaces or control characters"
            ' (got "/pre dict")',
        ),
        (
            {"docker_server.predict_endpoint": "/a\x07b"},
            "docker_server.predict_endpoint: must not contain spaces or control characters"
            ' (got "/a\\u0007b")',
        ),
        (
            {"docker_server.predict_endpoint": "//evil.example/predict"},
            'docker_server.predict_endpoint: must not start with "//"'
            ' (got "//evil.example/predict")',
        ),
        (
            {"docker_server.predict_endpoint": "/prédict"},
            "docker_server.predict_endpoint: must be ASCII (percent-encode other characters)"
            ' (got "/prédict")',
        ),
        (
            {"docker_server.predict_endpoint": "/predict#top"},
            'docker_server.predict_endpoint: must not contain "#" (got "/predict#top")',
        ),
        (
            {"docker_server.readiness_endpoint": "/health?full=1"},
            "docker_server.readiness_endpoint: must not contain a query string"
            ' (got "/health?full=1")',
        ),
        (
            {"docker_server.liveness_endpoint": 200},
            "docker_server.liveness_endpoint: must be a string (got 200)",
        ),
        # runtime
        ({"runtime": "fast"}, 'runtime: must be a mapping (got "fast")'),
        (
            {"runtime.predict_concurrency": "128"},
            'runtime.predict_concurrency: must be an integer >= 1 (got "128")',
        ),
        (
            {"runtime.predict_concurrency": 1.5},
            "runtime.predict_concurrency: must be an integer >= 1 (got 1.5)",
        ),
        (
            {"runtime.health_checks": [60]},
            "runtime.health_checks: must be a mapping (got [60])",
        ),
        (
            {"runtime.health_checks.startup_threshold_seconds": "30m"},
            "runtime.health_checks.startup_threshold_seconds: must be a number of seconds >= 0"
            ' (got "30m")',
        ),
        (
            {"runtime.health_checks.stop_traffic_threshold_seconds": float("inf")},
            "runtime.health_checks.stop_traffic_threshold_seconds: must be a number of seconds"
            " >= 0 (got inf)",
        ),
        (
            {"runtime.health_checks.restart_check_delay_seconds": -5},
            "runtime.health_checks.restart_check_delay_seconds: must be a number of seconds >= 0"
            " (got -5)",
        ),
        (
            {"runtime.health_checks.timeout": 5},
            "runtime.health_checks.timeout: unknown key; expected one of"
            " startup_threshold_seconds, stop_traffic_threshold_seconds,"
            " restart_threshold_seconds, restart_check_delay_seconds (got 5)",
        ),
        # environment_variables
        (
            {"environment_variables": ["HF_HOME=/data"]},
            'environment_variables: must be a mapping (got ["HF_HOME=/data"])',
        ),
        (
            {"environment_variables": {"": "x"}},
            'environment_variables: names must be non-empty strings without "=" or NUL (got "")',
        ),
        (
            {"environment_variables": {7: "x"}},
            'environment_variables: names must be non-empty strings without "=" or NUL (got 7)',
        ),
        (
            {"environment_variables": {"A": {"b": 1}}},
            "environment_variables.A: must be a string, number or boolean without NUL"
            ' (got {"b": 1})',
        ),
        (
            {"environment_variables": {"A": "x\0y"}},
            "environment_variables.A: must be a string, number or boolean without NUL"
            ' (got "x\\u0000y")',
        ),
        # secrets
        (
            {"secrets": ["../etc/passwd"]},
            'secrets: must be a file name in proxy.secrets_dir (not empty, no "/")'
            ' (got "../etc/passwd")',
        ),
        (
            {"secrets": {"..": None}},
            'secrets: must be a file name in proxy.secrets_dir (not empty, no "/") (got "..")',
        ),
        (
            {"secrets": "hf_abcdef"},
            "secrets: must be a mapping of names to null, or a list of names (got a str)",
        ),
        # proxy
        ({"proxy": "fast"}, 'proxy: must be a mapping (got "fast")'),
        ({"proxy.port": 8000}, "proxy.port: must differ from docker_server.server_port (got 8000)"),
        ({"proxy.port": "8080"}, 'proxy.port: must be an integer between 1 and 65535 (got "8080")'),
        ({"proxy.host": 127}, "proxy.host: must be a non-empty string (got 127)"),
        ({"proxy.max_queue_size": -1}, "proxy.max_queue_size: must be an integer >= 0 (got -1)"),
        (
            {"proxy.max_request_body_bytes": 1e6},
            "proxy.max_request_body_bytes: must be an integer >= 1 (got 1000000.0)",
        ),
        (
            {"proxy.queue_timeout_seconds": 0},
            "proxy.queue_timeout_seconds: must be a number of seconds > 0, or null for no limit"
            " (got 0)",
        ),
        (
            {"proxy.request_timeout_seconds": -0.5},
            "proxy.request_timeout_seconds: must be a number of seconds > 0, or null for no limit"
            " (got -0.5)",
        ),
        (
            {"proxy.probe_interval_seconds": -1},
            "proxy.probe_interval_seconds: must be a number of seconds > 0 (got -1)",
        ),
        (
            {"proxy.drain_quiet_seconds": True},
            "proxy.drain_quiet_seconds: must be a number of seconds >= 0 (got true)",
        ),
        (
            {"proxy.shutdown_grace_seconds": "30s"},
            'proxy.shutdown_grace_seconds: must be a number of seconds >= 0 (got "30s")',
        ),
        (
            {"proxy.child_stop_grace_seconds": float("nan")},
            "proxy.child_stop_grace_seconds: must be a number of seconds >= 0 (got nan)",
        ),
        (
            {"proxy.restart_policy": "on-failure"},
            'proxy.restart_policy: must be one of always, never (got "on-failure")',
        ),
        ({"proxy.log_format": "JSON"}, 'proxy.log_format: must be one of text, json (got "JSON")'),
        ({"proxy.secrets_dir": ""}, 'proxy.secrets_dir: must be a non-empty string (got "")'),
        (
            {"proxy.api_key_secret": "keys/api"},
            'proxy.api_key_secret: must be a file name in proxy.secrets_dir (not empty, no "/")'
            ' (got "keys/api")',
        ),
        (
            {"proxy.api_key_secret": ""},
            'proxy.api_key_secret: must be a non-empty string (got "")',
        ),
        (
            {"proxy.api_key": "x"},
            'proxy.api_key: unknown key; did you mean api_key_secret? (got "x")',
        ),
        (
            {"proxy.client_body_timeout_seconds": 0},
            "proxy.client_body_timeout_seconds: must be a number of seconds > 0 (got 0)",
        ),
        (
            {"proxy.probe_interval_seconds": 0},  # the probes would never pause
            "proxy.probe_interval_seconds: must be a number of seconds > 0 (got 0)",
        ),
        (
            {"proxy.buffer_request_body_bytes": -1},
            "proxy.buffer_request_body_bytes: must be an integer >= 0 (got -1)",
        ),
        (
            {"proxy.websocket_idle_timeout_seconds": 0},
            "proxy.websocket_idle_timeout_seconds: must be a number of seconds > 0, or null"
            " for no limit (got 0)",
        ),
        (
            {"proxy.log_level": "verbose"},
            'proxy.log_level: must be one of debug, info, warning, error (got "verbose")',
        ),
        (
            {"proxy.grpc_upstream_port": 8080},
            "proxy.grpc_upstream_port: must differ from proxy.port (got 8080)",
        ),
        (
            {"proxy.grpc_upstream_port": 8081, "runtime.transport.kind": "grpc"},
            "proxy.grpc_upstream_port: with runtime.transport.kind grpc the child serves gRPC"
            " on docker_server.server_port; remove one (got 8081)",
        ),
        (
            {"runtime.transport.kind": "h2"},
            'runtime.transport.kind: must be one of http, websocket, grpc (got "h2")',
        ),
        (
            {"runtime.transport.ping_interval_seconds": 20},
            "runtime.transport.ping_interval_seconds: only applies with"
            ' runtime.transport.kind websocket (got "http")',
        ),
        (
            {"runtime.transport": {"kind": "websocket", "ping_timeout_seconds": 5}},
            "runtime.transport.ping_timeout_seconds: needs ping_interval_seconds set (got 5.0)",
        ),
        (
            {"runtime.transport.kindd": "grpc"},
            'runtime.transport.kindd: unknown key; did you mean kind? (got "grpc")',
        ),
        # unknown keys under Truss's sections; a top-level key one typo from a known one
        (
            {"docker_server.readyness_endpoint": "/health"},
            "docker_server.readyness_endpoint: unknown key; did you mean readiness_endpoint?"
            ' (got "/health")',
        ),
        (
            {"runtime.predict_concurency": 128},
            "runtime.predict_concurency: unknown key; did you mean predict_concurrency? (got 128)",
        ),
        (
            {"docker_server.future_key": [1]},
            "docker_server.future_key: unknown key; expected one of start_command, server_port,"
            " predict_endpoint, readiness_endpoint, liveness_endpoint, run_as_user_id, no_build,"
            " setup_command (got [1])",
        ),
        ({"runtim": {}}, "runtim: unknown key; did you mean runtime? (got {})"),
        ({"Runtime": None}, "Runtime: unknown key; did you mean runtime? (got null)"),
        (
            {"enviroment_variables": {"A": 1}},
            'enviroment_variables: unknown key; did you mean environment_variables? (got {"A": 1})',
        ),
        ({"dokcer_server": 1}, "dokcer_server: unknown key; did you mean docker_server? (got 1)"),
        ({"proxyy": {}}, "proxyy: unknown key; did you mean proxy? (got {})"),
        ({"base_imag": "x"}, 'base_imag: unknown key; did you mean base_image? (got "x")'),
        (
            {"docker_server.run_as_user_id": 0},
            "docker_server.run_as_user_id: must be an integer >= 1 (got 0)",
        ),
        (
            {"docker_server.run_as_user_id": "1000"},
            'docker_server.run_as_user_id: must be an integer >= 1 (got "1000")',
        ),
        # preset keys: only their types are checked for now
        ({"implementation": ["vllm"]}, 'implementation: must be a string (got ["vllm"])'),
        ({"model_uri": 3}, "model_uri: must be a string (got 3)"),
        ({"preset_args": "x"}, 'preset_args: must be a mapping (got "x")'),
    ],
)
def test_each_rule_reports_its_problem(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    assert problems(tmp_path, with_values(MINIMAL, changes)) == [expected]


@pytest.mark.parametrize(
    "changes",
    [
        # every other Truss key, anywhere it may appear, is accepted and ignored
        {"base_image": {"image": "vllm/vllm-openai:latest"}, "requirements": ["torch"]},
        {"system_packages": ["ffmpeg"], "build_commands": ["echo"], "python_version": "py311"},
        {"resources": {"accelerator": "A10G"}, "model_metadata": {"x": 1}, "build": {}},
        {"model_class_name": "Model", "external_package_dirs": [], "description": "d"},
        {"runtime.transport": {"kind": "websocket"}, "runtime.streaming_read_timeout": 60},
        {"docker_server.run_as_user_id": 1000, "docker_server.no_build": False},
        {"docker_server.setup_command": "pip install x", "runtime.num_workers": 1},
        {"runtime.oidc": {"enabled": True}, "runtime.is_websocket_endpoint": True},
        {"runtime.egress_restrictions": None, "runtime.remote_ssh": {"enabled": False}},
        {"runtime.enable_tracing_data": True, "runtime.truss_server_version_override": "0.9"},
        {"model_cache": [{"repo_id": "x"}], "weights": [], "training_checkpoints": None},
        {"hf_cache": None, "trt_llm": {}, "bis_llm": None, "spec_version": "2.0"},
        {"model_framework": "custom", "model_type": "Model", "input_type": "Any"},
        {"examples_filename": "e.yaml", "data_dir": "data", "live_reload": False},
        # a key neither knows, unless it is one typo away from a known one: noted, not refused
        {"some_future_truss_key": {"nested": True}},
        # a server preset whose every key docker_server overrides (tests/test_presets.py)
        {"implementation": "vllm", "model_uri": "hf://org/model"},
        # null means "the default" everywhere
        {"proxy": None, "runtime": None, "environment_variables": None, "secrets": None},
        {"proxy.port": None, "runtime.predict_concurrency": None, "model_name": None},
        {"runtime.health_checks.restart_check_delay_seconds": 0.5},
        {"secrets": {}},
        {"secrets": []},
    ],
)
def test_accepted_without_problems(tmp_path: Path, changes: dict[str, Any]) -> None:
    config = load(tmp_path, with_values(MINIMAL, changes))

    assert config.docker_server.server_port == 8000


def test_environment_values_are_stringified_and_nulls_skipped(tmp_path: Path) -> None:
    env = {"S": "x", "I": 1, "F": 0.5, "T": True, "N": False, "SKIP": None, "lower": "ok"}

    config = load(tmp_path, with_values(MINIMAL, {"environment_variables": env}))

    assert dict(config.environment_variables) == {
        "S": "x",
        "I": "1",
        "F": "0.5",
        "T": "true",
        "N": "false",
        "lower": "ok",
    }


def test_secrets_may_be_a_list_and_need_not_be_listed_for_the_api_key(tmp_path: Path) -> None:
    for name in ("a", "b", "api"):
        secrets_dir = make_secret(tmp_path, name)
    data = with_values(
        MINIMAL,
        {
            "secrets": ["a", "b", "a"],
            "proxy.secrets_dir": str(secrets_dir),
            "proxy.api_key_secret": "api",
        },
    )

    config = load(tmp_path, data)

    assert config.secrets == ("a", "b")
    assert config.proxy.api_key_secret == "api"


def test_missing_secrets_never_show_placeholder_values(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "a_directory").mkdir()
    data = with_values(
        MINIMAL,
        {
            "secrets": {"hf_access_token": "hf_PLACEHOLDER", "a_directory": None},
            "proxy.secrets_dir": str(secrets_dir),
            "proxy.api_key_secret": "api_key",
        },
    )

    found = problems(tmp_path, data)

    assert found == [
        f"secrets.hf_access_token: secret file {secrets_dir}/hf_access_token is missing"
        + MISSING_HINT,
        f"secrets.a_directory: secret file {secrets_dir}/a_directory is not a regular file",
        f"proxy.api_key_secret: secret file {secrets_dir}/api_key is missing" + MISSING_HINT,
    ]
    assert "PLACEHOLDER" not in "\n".join(found)


def test_an_empty_api_key_file_is_an_error(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "api_key", " \n")
    data = with_values(
        MINIMAL, {"proxy.secrets_dir": str(secrets_dir), "proxy.api_key_secret": "api_key"}
    )

    assert problems(tmp_path, data) == [
        f"proxy.api_key_secret: secret file {secrets_dir}/api_key is empty"
    ]


def test_an_invalid_secrets_dir_skips_the_secret_file_checks(tmp_path: Path) -> None:
    data = with_values(MINIMAL, {"secrets": ["tok"], "proxy.secrets_dir": 5})

    assert problems(tmp_path, data) == ["proxy.secrets_dir: must be a non-empty string (got 5)"]


def test_read_secret_strips_surrounding_whitespace(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "api_key", "  tok3n \n")
    config = load(tmp_path, with_values(MINIMAL, {"proxy.secrets_dir": str(secrets_dir)}))

    assert read_secret(config, "api_key") == "tok3n"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "gone",
            None,
            "secrets.gone: secret file {dir}/gone is missing" + MISSING_HINT,
        ),
        ("blank", "\n\t ", "secrets.blank: secret file {dir}/blank is empty"),
        ("binary", b"\xff\xfe", "secrets.binary: secret file {dir}/binary is not UTF-8 text"),
        (
            "../x",
            None,
            'secrets.../x: must be a file name in proxy.secrets_dir (not empty, no "/")'
            ' (got "../x")',
        ),
    ],
)
def test_read_secret_raises_config_error_when_unusable(
    tmp_path: Path, name: str, content: str | bytes | None, expected: str
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    if isinstance(content, bytes):
        (secrets_dir / name).write_bytes(content)
    elif content is not None:
        (secrets_dir / name).write_text(content)
    config = load(tmp_path, with_values(MINIMAL, {"proxy.secrets_dir": str(secrets_dir)}))

    with pytest.raises(ConfigError) as caught:
        read_secret(config, name)

    assert caught.value.problems == [expected.format(dir=secrets_dir)]


def test_missing_file_names_it_and_says_how_to_choose_another(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems == [
        f"{path}: no such file (pass --config PATH or set MODEL_PROXY_CONFIG)"
    ]


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    [problem] = caught.value.problems
    assert problem.startswith(f"{tmp_path}: cannot read (")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model_name: m\ndocker_server:\n  start_command: python: server.py\n",
            "{path}:3:24: invalid YAML: mapping values are not allowed here",
        ),
        (
            'docker_server:\n  start_command: "vllm serve\n',
            "{path}:3:1: invalid YAML: found unexpected end of stream"
            " (while scanning a quoted scalar at line 2)",
        ),
        (
            "docker_server:\n\tserver_port: 8000\n",
            "{path}:2:1: invalid YAML: found character '\\t' that cannot start any token",
        ),
    ],
)
def test_yaml_syntax_errors_name_the_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems == [expected.format(path=path)]


def test_the_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- docker_server\n- proxy\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems == [
        f'{path}: the top level must be a mapping of keys (got ["docker_server", "proxy"])'
    ]


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_an_empty_file_reports_the_required_keys(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))

    assert caught.value.problems == [
        "docker_server.start_command: required",
        "docker_server.server_port: required",
        "docker_server.predict_endpoint: required",
    ]


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, with_values(MINIMAL, {"model_name": ["x" * 200]}))

    assert problem.startswith('model_name: must be a string (got ["xxx')
    assert problem.endswith("xxx...)")
    assert len(problem) < 120


def test_render_config_is_yaml_with_every_setting_in_order(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "hf_access_token")
    config = load_config(write(tmp_path, VLLM_TRUSS + f"proxy:\n  secrets_dir: {secrets_dir}\n"))

    rendered = yaml.safe_load(render_config(config))

    assert list(rendered) == [
        "model_name",
        "docker_server",
        "runtime",
        "environment_variables",
        "secrets",
        "proxy",
    ]
    assert rendered["model_name"] == "Llama 3.1 8B Instruct vLLM"
    assert rendered["docker_server"]["start_command"] == config.docker_server.start_command
    assert list(rendered["docker_server"]) == [f.name for f in dataclasses.fields(DockerServer)]
    assert rendered["runtime"] == {
        "predict_concurrency": 128,
        "health_checks": {
            "startup_threshold_seconds": 1800.0,
            "stop_traffic_threshold_seconds": 60.0,
            "restart_threshold_seconds": 90.0,
        },
        "transport": {
            "kind": "http",
            "ping_interval_seconds": None,
            "ping_timeout_seconds": None,
        },
    }
    assert rendered["environment_variables"] == {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
    }
    assert rendered["secrets"] == ["hf_access_token"]
    assert list(rendered["proxy"]) == [f.name for f in dataclasses.fields(ProxySettings)]
    assert rendered["proxy"]["max_queue_size"] == 1280
    assert rendered["proxy"]["secrets_dir"] == str(secrets_dir)
    assert rendered["proxy"]["queue_timeout_seconds"] is None


def test_truss_keys_with_no_effect_are_noted_one_line_each(tmp_path: Path) -> None:
    secrets_dir = make_secret(tmp_path, "hf_access_token")
    text = VLLM_TRUSS + f"proxy:\n  secrets_dir: {secrets_dir}\nmy_own_key: 1\n"

    notes = load_config(write(tmp_path, text)).notes

    # null, false and empty values ask for nothing: no note (requirements: [], ...)
    assert [note.partition(":")[0] for note in notes] == [
        "description",
        "python_version",
        "base_image",
        "model_metadata",
        "resources",
        "my_own_key",
        "runtime.streaming_read_timeout",
        "environment_variables.UNSET_BY_TRUSS",
    ]
    assert notes[0] == "description: no effect in model-proxy (documentation only)"
    assert notes[5] == "my_own_key: not a key of model-proxy or Truss: ignored"
    assert "proxy.request_timeout_seconds" in notes[6]
    assert notes[7].startswith("environment_variables.UNSET_BY_TRUSS: null, so not set")
    assert load(tmp_path, MINIMAL).notes == ()


def test_render_config_round_trips_through_load_config(tmp_path: Path) -> None:

    secrets_dir = make_secret(tmp_path, "api_key")
    data = with_values(
        MINIMAL,
        {
            "model_name": "yes",  # a string YAML 1.1 would read as a bool unless quoted
            "docker_server.start_command": "sh -c 'echo \"#1: x\" && exec python s.py'",
            "environment_variables": {"A": "on", "B": "0123", "C": 1.0},
            "proxy.secrets_dir": str(secrets_dir),
            "proxy.api_key_secret": "api_key",
            "proxy.request_timeout_seconds": 0.5,
        },
    )
    config = load(tmp_path, data)
    again = tmp_path / "rendered.yaml"
    again.write_text(render_config(config))

    assert load_config(again) == config


def test_a_grpc_transport_serves_grpc_on_the_server_port(tmp_path: Path) -> None:
    config = load(tmp_path, with_values(MINIMAL, {"runtime.transport.kind": "grpc"}))

    assert config.grpc_port == 8000
    assert load(tmp_path, MINIMAL).grpc_port is None


def test_truss_debug_logs_mean_log_level_debug(tmp_path: Path) -> None:
    config = load(tmp_path, with_values(MINIMAL, {"runtime.enable_debug_logs": True}))

    assert config.proxy.log_level == "debug"
    explicit = {"runtime.enable_debug_logs": True, "proxy.log_level": "error"}
    assert load(tmp_path, with_values(MINIMAL, explicit)).proxy.log_level == "error"
