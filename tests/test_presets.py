"""Server presets: the built-in registry's facts, expansion into docker_server, overrides, a
user's own registry, every problem with its path, and `model-proxy presets` / `check`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import presets
from proxy.cli import main
from proxy.config import Config, DockerServer, load_config, render_config
from proxy.errors import ConfigError

from .conftest import ECHO_SERVER, ROOT, free_port, run_proxy, write_config

# name: (port, predict, readiness, liveness) as each server's own documentation has them
KNOWN_SERVERS = {
    "VLLM": (8000, "/v1/chat/completions", "/health", "/health"),
    "SGLANG": (30000, "/v1/chat/completions", "/health", "/health"),
    "TGI": (3000, "/v1/chat/completions", "/health", "/health"),
    "TRITON_SERVER": (8000, "/v2/models/m/infer", "/v2/health/ready", "/v2/health/live"),
    # /v2/health/ready is 200 before the model is registered: the model's own route it is
    "MLSERVER": (8000, "/v2/models/m/infer", "/v2/models/m/ready", "/v2/health/live"),
    "SELDON_MICROSERVICE": (9000, "/api/v1.0/predictions", "/health/status", "/health/ping"),
    "INFINITY": (7997, "/embeddings", "/health", "/health"),
    "LLAMA_CPP": (8000, "/v1/chat/completions", "/health", "/health"),
    "OLLAMA": (11434, "/api/chat", "/api/version", "/api/version"),
    "TORCHSERVE": (8000, "/predictions/m", "/ping", "/ping"),
}
# what each needs besides model_uri
ARGS = {"SELDON_MICROSERVICE": {"model_class": "Model"}}
# servers with no way to bind them to 127.0.0.1 (servers.yaml says so)
LISTENS_EVERYWHERE = {"SELDON_MICROSERVICE"}
# name: (metrics endpoint, its port) of the servers that serve Prometheus metrics
METRICS = {
    "VLLM": ("/metrics", 8000),
    "SGLANG": ("/metrics", 30000),  # with --enable-metrics
    "TGI": ("/metrics", 3000),
    "TRITON_SERVER": ("/metrics", 8002),
    "MLSERVER": ("/metrics", 8082),
    "SELDON_MICROSERVICE": ("/metrics", 6000),
    "LLAMA_CPP": ("/metrics", 8000),  # with --metrics
}


def write(directory: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(directory: Path, **data: Any) -> Config:
    return load_config(write(directory, data))


def problems(directory: Path, **data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(directory, **data)
    return caught.value.problems


VALID_ENTRY = {"description": "d", "start_command": "s", "server_port": 1, "predict_endpoint": "/"}


def user_registry(directory: Path, servers: dict[str, Any], name: str = "servers.yaml") -> Path:
    return write(directory, {"servers": servers}, name)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_the_registry_is_installed_as_package_data() -> None:
    files = resources.files("proxy.registry")

    assert files.joinpath("servers.yaml").read_text() == (ROOT / "config/servers.yaml").read_text()
    assert files.joinpath("schema.json").is_file()


@pytest.mark.parametrize("name", sorted(KNOWN_SERVERS))
def test_each_known_server_expands_to_its_real_defaults(tmp_path: Path, name: str) -> None:
    port, predict, readiness, liveness = KNOWN_SERVERS[name]
    data: dict[str, Any] = {"implementation": name, "model_name": "m"}
    if name != "OLLAMA":  # a request names its model there
        data["model_uri"] = "org/model"
    if name in ARGS:
        data["preset_args"] = ARGS[name]

    config = load(tmp_path, **data)

    server = config.docker_server
    assert (server.server_port, server.predict_endpoint) == (port, predict)
    assert (server.readiness_endpoint, server.liveness_endpoint) == (readiness, liveness)
    assert str(port) in server.start_command
    if "model_uri" in data:
        assert "org/model" in server.start_command
    assert config.implementation == name
    assert config.proxy.port != port  # every preset fits beside the proxy's default 8080
    # only the proxy talks to it: with api_key_secret set, a server listening on every
    # interface would answer on its own port without the key
    if name not in LISTENS_EVERYWHERE:
        assert "127.0.0.1" in server.start_command
    endpoint, metrics_port = METRICS.get(name, (None, None))
    assert config.proxy.upstream_metrics_endpoint == endpoint
    assert (config.proxy.upstream_metrics_port or server.server_port) == (metrics_port or port)


def test_the_registry_covers_the_servers_users_run() -> None:
    assert set(KNOWN_SERVERS) <= set(presets.load_registry())


def test_vllm_expands_to_basetens_docker_server(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        implementation="vllm",  # any case
        model_uri="meta-llama/Llama-3.1-8B-Instruct",
        preset_args={"extra_args": "--max-model-len 8192 --dtype auto"},
    )

    assert config.docker_server == DockerServer(
        start_command="vllm serve meta-llama/Llama-3.1-8B-Instruct --host 127.0.0.1 --port 8000"
        " --max-model-len 8192 --dtype auto",
        server_port=8000,
        predict_endpoint="/v1/chat/completions",
        readiness_endpoint="/health",
        liveness_endpoint="/health",
    )
    assert config.implementation == "VLLM"
    assert config.model_uri == "meta-llama/Llama-3.1-8B-Instruct"


def test_explicit_docker_server_keys_override_the_preset(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        implementation="MLSERVER",
        model_uri="/models/iris",
        model_name="iris",
        docker_server={"server_port": 9100, "liveness_endpoint": "/v2/health/ready"},
    )

    server = config.docker_server
    # the port reaches the start command too: the server is told where to listen
    assert server.server_port == 9100
    assert "MLSERVER_HTTP_PORT=9100" in server.start_command
    assert server.liveness_endpoint == "/v2/health/ready"
    assert server.readiness_endpoint == "/v2/models/iris/ready"  # kept from the preset


def test_an_explicit_start_command_replaces_the_template(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        implementation="TGI",
        model_uri="unused",
        docker_server={"start_command": "my-tgi --port 3000", "predict_endpoint": "/generate"},
    )

    assert config.docker_server.start_command == "my-tgi --port 3000"
    assert config.docker_server.predict_endpoint == "/generate"
    assert config.docker_server.readiness_endpoint == "/health"


def test_preset_args_name_the_model_over_the_top_level_model_name(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        implementation="TRITON_SERVER",
        model_uri="/models",
        model_name="label in logs",
        preset_args={"model_name": "resnet 50/v2", "extra_args": None},  # null: the default
    )

    assert config.docker_server.predict_endpoint == "/v2/models/resnet%2050%2Fv2/infer"
    assert config.model_name == "label in logs"


# the values a shell must receive byte for byte
AWKWARD = ["/models/my model", "it's", 'a "quoted" $HOME `id` ;|&', "ünï", "-x"]


@pytest.mark.parametrize("value", AWKWARD)
def test_values_reach_the_command_exactly_as_written(tmp_path: Path, value: str) -> None:
    show_argv = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    as_json = "printf %s '[{model_uri:json}]'"
    registry = user_registry(
        tmp_path,
        {
            "ARGV": {
                "description": "prints its arguments",
                "start_command": f"{show_argv} {{model_uri}} {{model_name}} {{flag}}",
                "server_port": 8000,
                "predict_endpoint": "/",
                "args": {"flag": "--on"},
            },
            "JSON": {
                "description": "prints JSON",
                "start_command": as_json,
                "server_port": 8000,
                "predict_endpoint": "/",
            },
        },
    )

    def shell(implementation: str) -> str:
        config = load(
            tmp_path,
            implementation=implementation,
            model_uri=value,
            model_name=value,
            proxy={"presets_file": registry.name},  # relative to the config's folder
        )
        done = subprocess.run(
            ["sh", "-c", config.docker_server.start_command],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    assert json.loads(shell("argv")) == [value, value, "--on"]
    assert json.loads(shell("json")) == [value]


def test_seldon_passes_model_uri_as_a_typed_parameter(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        implementation="SELDON_MICROSERVICE",
        model_uri="s3://bucket/model",
        preset_args={"model_class": "serving.Model", "extra_args": "--workers 2"},
    )

    command = config.docker_server.start_command
    assert command.startswith("seldon-core-microservice serving.Model --service-type MODEL ")
    assert command.endswith(" --workers 2")
    # what seldon-core-microservice's --parameters receives, once the shell has unquoted it
    done = subprocess.run(
        ["sh", "-c", command.replace("seldon-core-microservice", "printf '%s\\n'", 1)],
        capture_output=True,
        text=True,
        check=True,
    )
    parameters = done.stdout.splitlines()[done.stdout.splitlines().index("--parameters") + 1]
    assert json.loads(parameters) == [
        {"name": "model_uri", "type": "STRING", "value": "s3://bucket/model"}
    ]


def test_mlserver_keeps_a_parallel_workers_setting_from_the_environment(tmp_path: Path) -> None:
    config = load(tmp_path, implementation="MLSERVER", model_uri=".", model_name="m")
    command = config.docker_server.start_command.replace("mlserver start", "printenv", 1)

    def workers(environment: dict[str, str]) -> str:
        done = subprocess.run(
            ["sh", "-c", f"{command} MLSERVER_PARALLEL_WORKERS"],
            capture_output=True,
            text=True,
            env=environment,
            check=False,
        )
        return done.stdout.splitlines()[0]

    assert workers({}) == "0"  # uvloop >= 0.22 breaks MLServer's worker pool
    assert workers({"MLSERVER_PARALLEL_WORKERS": "2"}) == "2"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"implementation": "VLM", "model_uri": "x"},
            ['implementation: unknown server preset; did you mean VLLM? (got "VLM")'],
        ),
        ({"implementation": "VLLM"}, ["model_uri: required by implementation VLLM"]),
        (
            {"implementation": "MLSERVER", "model_uri": "."},
            [
                "preset_args.model_name: required by implementation MLSERVER"
                " (or set the top-level model_name)"
            ],
        ),
        (
            {"implementation": "SELDON_MICROSERVICE", "model_uri": "."},
            ["preset_args.model_class: required by implementation SELDON_MICROSERVICE"],
        ),
        (
            {"implementation": "VLLM", "model_uri": "x", "preset_args": {"max_len": 8}},
            [
                "preset_args.max_len: unknown argument of VLLM; expected one of model_name,"
                " extra_args (got 8)"
            ],
        ),
        (
            {"implementation": "VLLM", "model_uri": "x", "preset_args": {"extra_args": ["a"]}},
            ['preset_args.extra_args: must be a string, number or boolean (got ["a"])'],
        ),
        (
            {
                "implementation": "VLLM",
                "model_uri": "x",
                "preset_args": {"extra_args": "--x"},
                "docker_server": {"start_command": "vllm serve x"},
            },
            [
                "preset_args.extra_args: has no effect: docker_server.start_command replaces"
                ' the preset\'s (got "--x")'
            ],
        ),
        (
            {"model_uri": "x", "docker_server": {"start_command": "s", "server_port": 1}},
            [
                'model_uri: needs implementation: the server preset it is for (got "x")',
                "docker_server.predict_endpoint: required",
            ],
        ),
        (
            {"implementation": "VLLM", "model_uri": "x", "proxy": {"presets_file": 3}},
            ["proxy.presets_file: must be a non-empty string (got 3)"],
        ),
        (
            {"implementation": "VLLM", "model_uri": "x", "docker_server": "vllm"},
            ['docker_server: must be a mapping (got "vllm")'],
        ),
        (
            # the preset's endpoints are checked like the user's own
            {
                "implementation": "VLLM",
                "model_uri": "x",
                "docker_server": {"readiness_endpoint": "health", "server_port": 8080},
            },
            [
                'docker_server.readiness_endpoint: must start with "/" (got "health")',
                "proxy.port: must differ from docker_server.server_port (got 8080)",
            ],
        ),
        (
            # an unknown preset: what the user wrote is still checked, nothing said "required"
            {"implementation": "nope", "docker_server": {"server_port": "x"}},
            [
                "implementation: unknown server preset; expected one of VLLM, SGLANG, TGI,"
                " TRITON_SERVER, MLSERVER, SELDON_MICROSERVICE, INFINITY, LLAMA_CPP, OLLAMA,"
                ' TORCHSERVE (got "nope")',
                'docker_server.server_port: must be an integer between 1 and 65535 (got "x")',
            ],
        ),
    ],
)
def test_every_problem_is_reported_with_its_path(
    tmp_path: Path, data: dict[str, Any], expected: list[str]
) -> None:
    assert problems(tmp_path, **data) == expected


def test_a_presets_metrics_endpoint_yields_to_the_configs_own(tmp_path: Path) -> None:
    triton = {"implementation": "TRITON_SERVER", "model_uri": "/models", "model_name": "m"}

    preset = load(tmp_path, **triton).proxy
    moved = load(tmp_path, **triton, proxy={"upstream_metrics_port": 9102}).proxy
    off = load(tmp_path, **triton, proxy={"upstream_metrics_endpoint": None}).proxy
    own = load(
        tmp_path,
        docker_server={"start_command": "s", "server_port": 1, "predict_endpoint": "/"},
        proxy={"upstream_metrics_endpoint": "/stats?format=prometheus"},
    ).proxy

    assert (preset.upstream_metrics_endpoint, preset.upstream_metrics_port) == ("/metrics", 8002)
    assert (moved.upstream_metrics_endpoint, moved.upstream_metrics_port) == ("/metrics", 9102)
    assert off.upstream_metrics_endpoint is None  # null turns the preset's off
    assert (own.upstream_metrics_endpoint, own.upstream_metrics_port) == (
        "/stats?format=prometheus",
        None,  # the model server's own port
    )
    # `check` shows what the preset filled, and what it shows loads back the same
    for proxy in ({}, {"upstream_metrics_endpoint": None}):
        path = write(tmp_path, {**triton, "proxy": proxy})
        code, out, _ = run_cli("check", "--config", str(path))
        assert code == 0
        again = tmp_path / "again.yaml"
        again.write_text(out)
        assert load_config(again) == load_config(path)


def test_a_metrics_port_must_not_be_the_proxys_own(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        implementation="VLLM",
        model_uri="m",
        proxy={"upstream_metrics_port": 8080, "upstream_metrics_endpoint": "/metrics"},
    )

    assert found == [
        "proxy.upstream_metrics_port: must differ from proxy.port: the proxy would scrape"
        " itself (got 8080)"
    ]


def test_a_user_registry_adds_and_replaces_presets(tmp_path: Path) -> None:
    registry = user_registry(
        tmp_path,
        {
            "my_server": {
                "description": "ours",
                "start_command": "serve {model_uri} --port {port} --level {level}",
                "server_port": 7000,
                "predict_endpoint": "/run",
                "args": {"level": 3},
            },
            "vllm": {  # replaces the built-in entry of that name
                "description": "our pinned vLLM flags",
                "start_command": "vllm serve {model_uri} --port {port} --enforce-eager",
                "server_port": 8001,
                "predict_endpoint": "/v1/completions",
            },
        },
    )

    mine = load(
        tmp_path, implementation="MY_SERVER", model_uri="m", proxy={"presets_file": str(registry)}
    )
    theirs = load(
        tmp_path, implementation="VLLM", model_uri="m", proxy={"presets_file": str(registry)}
    )

    assert mine.docker_server == DockerServer(
        start_command="serve m --port 7000 --level 3", server_port=7000, predict_endpoint="/run"
    )
    assert mine.proxy.presets_file == registry
    assert theirs.docker_server.start_command == "vllm serve m --port 8001 --enforce-eager"
    assert theirs.docker_server.readiness_endpoint is None  # the entry is replaced whole


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        (
            {
                "X": {**VALID_ENTRY, "metrics_endpoint": "metrics", "metrics_port": 70000},
                "Y": {**VALID_ENTRY, "metrics_port": 9102},
            },
            [
                'servers.X.metrics_endpoint: must start with "/" (got "metrics")',
                "servers.X.metrics_port: must be an integer between 1 and 65535 (got 70000)",
                "servers.Y.metrics_port: needs metrics_endpoint (got 9102)",
            ],
        ),
        (
            {"X": {"description": "d", "server_port": 0, "predict_endpoint": "p"}},
            [
                "servers.X.start_command: required, a non-empty string (got null)",
                "servers.X.server_port: required, an integer between 1 and 65535 (got 0)",
                'servers.X.predict_endpoint: must start with "/" (got "p")',
            ],
        ),
        (
            {
                "X": {
                    "description": "d",
                    "start_command": "run {model}",
                    "server_port": 1,
                    "predict_endpoint": "/{model_uri:json}",
                    "port": 2,
                }
            },
            [
                "servers.X.port: unknown key; expected one of description, docs, server_port,"
                " args, start_command, predict_endpoint, readiness_endpoint, liveness_endpoint,"
                " metrics_endpoint, metrics_port",
                'servers.X.start_command: unknown placeholder {model} (got "run {model}")',
                "servers.X.predict_endpoint: unknown format {model_uri:json}"
                ' (got "/{model_uri:json}")',
            ],
        ),
        (
            {
                "X": {
                    "description": "d",
                    "start_command": "run {0} {a.b}",
                    "server_port": 1,
                    "predict_endpoint": "/",
                    "args": {"port": 1},
                },
                "bad name": {},
            },
            [
                "servers.X.args: a name is letters, digits and _, and not one of port,"
                ' model_uri, model_name, extra_args (got "port")',
                "servers.X.start_command: bad template: {0} is not a plain {name} placeholder"
                ' (got "run {0} {a.b}")',
                'servers.bad name: a preset name is letters, digits and _ (got "bad name")',
            ],
        ),
    ],
)
def test_a_bad_user_registry_is_reported_entry_by_entry(
    tmp_path: Path, servers: dict[str, Any], expected: list[str]
) -> None:
    registry = user_registry(tmp_path, servers)
    # reported even while no implementation uses it
    data = {"docker_server": {"start_command": "s", "server_port": 1, "predict_endpoint": "/"}}

    found = problems(tmp_path, **data, proxy={"presets_file": "servers.yaml"})

    assert found == [f"proxy.presets_file: {registry}: {line}" for line in expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "no such presets file"),
        ("servers: [a\n", "invalid YAML"),
        ("- a\n", "must be a mapping with a `servers:` mapping of presets"),
    ],
)
def test_an_unreadable_user_registry_is_one_problem(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    registry = tmp_path / "servers.yaml"
    if text is not None:
        registry.write_text(text)

    [problem] = problems(
        tmp_path, implementation="VLLM", model_uri="m", proxy={"presets_file": "servers.yaml"}
    )

    assert problem.startswith(f"proxy.presets_file: {registry}")
    assert expected in problem


def test_check_shows_the_expanded_preset_and_it_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"model_name": "iris", "implementation": "mlserver", "model_uri": "/models/iris"},
    )

    code, out, _ = run_cli("check", "--config", str(path))

    assert code == 0
    shown = yaml.safe_load(out)
    assert list(shown)[:4] == ["model_name", "implementation", "model_uri", "docker_server"]
    assert shown["implementation"] == "MLSERVER"
    assert shown["docker_server"]["readiness_endpoint"] == "/v2/models/iris/ready"
    assert "mlserver start /models/iris" in shown["docker_server"]["start_command"]
    again = tmp_path / "again.yaml"
    again.write_text(out)
    assert load_config(again) == load_config(path) == load_config(again)
    assert render_config(load_config(again)) == out


def test_presets_lists_name_port_endpoints_and_start_template() -> None:
    code, out, _ = run_cli("presets")

    assert code == 0
    blocks = out.strip().split("\n\n")
    assert [block.split()[0] for block in blocks] == list(presets.load_registry())
    [mlserver] = [block for block in blocks if block.startswith("MLSERVER ")]
    assert "  port       8000\n" in mlserver
    assert "  metrics    port 8082, /metrics\n" in mlserver
    assert "  readiness  /v2/models/{model_name}/ready\n" in mlserver
    assert "mlserver start {model_uri}" in mlserver


def test_presets_shows_one_preset_and_a_users_file(tmp_path: Path) -> None:
    registry = user_registry(
        tmp_path,
        {
            "echo": {
                "description": "d",
                "start_command": "e",
                "server_port": 1,
                "predict_endpoint": "/",
            }
        },
    )

    code, out, _ = run_cli("presets", "Echo", "--file", str(registry))
    missing, _, error = run_cli("presets", "ECHO")
    bad = user_registry(tmp_path, {"X": {}}, "bad.yaml")
    invalid, _, complaint = run_cli("presets", "--file", str(bad))

    assert code == 0
    assert out.splitlines()[0] == "ECHO  d"
    assert f"  from       {registry}" in out
    assert "  readiness  (the port accepts TCP)" in out
    assert (missing, invalid) == (2, 2)
    assert "unknown server preset" in error
    assert f"{bad}: servers.X.description: required" in complaint


async def test_a_user_preset_runs_a_real_model_server(tmp_path: Path) -> None:
    """The whole path: a preset from the user's file, expanded, started, probed, proxied."""
    user_registry(
        tmp_path,
        {
            "ECHO": {
                "description": "examples/echo",
                "start_command": f"{sys.executable} {{model_uri}} --port {{port}}",
                "server_port": 8000,
                "predict_endpoint": "/predict",
                "readiness_endpoint": "/health",
                "liveness_endpoint": "/health",
            }
        },
    )
    config = write_config(
        tmp_path,
        proxy={"presets_file": "servers.yaml"},
        # replaces write_config's docker_server: the preset fills it, on a free port
        extra={
            "implementation": "echo",
            "model_uri": str(ECHO_SERVER),
            "docker_server": {"server_port": free_port()},
        },
    )

    async with (
        run_proxy(config) as proxy,
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/predict", json={"x": 1}) as response,
    ):
        assert response.status == 200
        assert await response.json() == {"echo": {"x": 1}, "model": "echo"}
