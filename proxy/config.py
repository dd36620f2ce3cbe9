"""Load and validate config.yaml into frozen settings; every problem reported at once with
its dotted path."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeGuard

import yaml

from proxy import presets, truss
from proxy.errors import ConfigError
from proxy.sections import Section, show

RestartPolicy = Literal["always", "never"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
TransportKind = Literal["http", "websocket", "grpc"]
_RESTART_POLICIES: tuple[RestartPolicy, ...] = ("always", "never")
_LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
_LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
_TRANSPORT_KINDS: tuple[TransportKind, ...] = ("http", "websocket", "grpc")
_HOW_TO_CHOOSE = "pass --config PATH or set MODEL_PROXY_CONFIG"
_NAME_RULE = 'must be a file name in proxy.secrets_dir (not empty, no "/")'


@dataclass(frozen=True, slots=True, kw_only=True)
class DockerServer:
    """How to start the model server and where it answers (Truss's `docker_server`)."""

    start_command: str
    server_port: int
    predict_endpoint: str
    readiness_endpoint: str | None = None
    liveness_endpoint: str | None = None
    run_as_user_id: int | None = None  # the model server runs as this uid (the proxy as root)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChecks:
    """Truss's `runtime.health_checks`, in seconds."""

    startup_threshold_seconds: float = 1800.0
    stop_traffic_threshold_seconds: float = 60.0
    restart_threshold_seconds: float = 90.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Transport:
    """Truss's `runtime.transport`: what the model server speaks, and WebSocket keepalive."""

    kind: TransportKind = "http"
    # websocket: ping idle clients this often; close one that has not answered in the timeout
    ping_interval_seconds: float | None = None
    ping_timeout_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """The proxy's own `proxy:` section."""

    host: str = "0.0.0.0"
    port: int = 8080
    max_queue_size: int  # load_config's default: 10 * predict_concurrency
    queue_timeout_seconds: float | None = None
    request_timeout_seconds: float | None = None
    max_request_body_bytes: int = 104857600
    probe_interval_seconds: float = 1.0
    drain_quiet_seconds: float = 3.0
    shutdown_grace_seconds: float = 30.0
    child_stop_grace_seconds: float = 10.0
    restart_policy: RestartPolicy = "always"
    secrets_dir: Path = Path("/secrets")
    api_key_secret: str | None = None
    metrics_require_api_key: bool = False  # /metrics needs the API key too
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    access_log: bool = True  # one line per proxied request
    presets_file: Path | None = None  # a registry of the user's own server presets
    # how long a client may take; each bounds a way to hold a connection or a slot
    client_header_timeout_seconds: float = 30.0
    client_body_timeout_seconds: float = 60.0
    client_send_timeout_seconds: float = 60.0
    keepalive_timeout_seconds: float = 75.0
    buffer_request_body_bytes: int = 1048576
    websocket_idle_timeout_seconds: float | None = 600.0
    grpc_upstream_port: int | None = None  # gRPC beside HTTP (MLServer 8081, Triton 8001)
    grpc_health_service: str = ""
    upstream_metrics_endpoint: str | None = None  # the child's own Prometheus endpoint
    upstream_metrics_port: int | None = None  # where it listens (None: server_port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A validated config.yaml."""

    model_name: str | None
    docker_server: DockerServer
    predict_concurrency: int
    health_checks: HealthChecks
    transport: Transport
    proxy: ProxySettings
    environment_variables: Mapping[str, str]
    secrets: tuple[str, ...]
    # the server preset docker_server was expanded from, if any (canonical name)
    implementation: str | None = None
    model_uri: str | None = None
    # what a user should know about keys that were accepted but do nothing (`check` shows it)
    notes: tuple[str, ...] = ()

    @property
    def grpc_port(self) -> int | None:
        """The child's gRPC port, if it serves gRPC at all."""
        if self.proxy.grpc_upstream_port is not None:
            return self.proxy.grpc_upstream_port
        return self.docker_server.server_port if self.transport.kind == "grpc" else None


_PROXY_KEYS = tuple(f.name for f in fields(ProxySettings))
# Truss's restart_check_delay_seconds is accepted and checked, but has no use here
_HEALTH_KEYS = (*(f.name for f in fields(HealthChecks)), *truss.HEALTH_CHECKS)
_TRANSPORT_KEYS = tuple(f.name for f in fields(Transport))
_DOCKER_KEYS = (*(f.name for f in fields(DockerServer)), *truss.DOCKER_SERVER)
_RUNTIME_KEYS = (
    "predict_concurrency", "health_checks", "transport", "enable_debug_logs", *truss.RUNTIME
)  # fmt: skip
_READ_KEYS = ("model_name", "docker_server", "runtime", "environment_variables", "secrets")
_PRESET_KEYS = ("implementation", "model_uri", "preset_args")
_TOP_KEYS = (*_READ_KEYS, *_PRESET_KEYS, "proxy", *truss.TOP_LEVEL)


def load_config(path: Path, *, host: str | None = None, port: int | None = None) -> Config:
    """Read and validate `path`, or raise one ConfigError listing every problem.

    `host` and `port` are the CLI's --host/--port: they replace proxy.host and proxy.port
    before validation, so they are checked exactly like the file's own values.
    """
    data = _read_yaml(path)
    problems: list[str] = []
    notes = _top_level_keys(data, problems)
    top = Section(data, "", problems)
    model_name = top.text("model_name") or None
    raw_proxy = data.get("proxy")
    if raw_proxy is None or isinstance(raw_proxy, Mapping):
        overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        raw_proxy = {**(raw_proxy or {}), **overrides}
    # read first, for the presets file; its problems are listed after the other sections'
    proxy_problems: list[str] = []
    proxy_section = Section(raw_proxy, "proxy", proxy_problems, known=_PROXY_KEYS)
    presets_file = _presets_file(proxy_section, path.parent)
    implementation, model_uri, docker, preset_proxy = _docker_from_preset(
        top, model_name, presets_file
    )
    # what the preset says of the proxy: settings the config's proxy: section does not name
    # (a key set to null there is named: null turns the preset's value off)
    proxy_section.data = {**preset_proxy, **proxy_section.data}
    runtime = top.child("runtime", known=_RUNTIME_KEYS)
    concurrency = runtime.integer("predict_concurrency", 1, low=1)
    health_section = runtime.child("health_checks", known=_HEALTH_KEYS)
    health = _health_checks(health_section)
    transport = _transport(runtime.child("transport", known=_TRANSPORT_KEYS))
    debug = runtime.boolean("enable_debug_logs", False)
    raw_docker = data.get("docker_server")
    notes += truss.unused(
        raw_docker if isinstance(raw_docker, Mapping) else {}, truss.DOCKER_SERVER, "docker_server."
    )
    notes += truss.unused(runtime.data, truss.RUNTIME, "runtime.")
    notes += truss.unused(health_section.data, truss.HEALTH_CHECKS, "runtime.health_checks.")
    environment = _environment(top.child("environment_variables"), notes)
    secrets = _secret_names(data.get("secrets"), problems)

    proxy = _proxy_settings(proxy_section, concurrency, presets_file, debug=debug)
    problems.extend(proxy_problems)

    if proxy.port and proxy.port == docker.server_port:  # 0: already reported as invalid
        problems.append(
            f"proxy.port: must differ from docker_server.server_port (got {proxy.port})"
        )
    if proxy.upstream_metrics_endpoint and proxy.upstream_metrics_port == proxy.port:
        problems.append(
            "proxy.upstream_metrics_port: must differ from proxy.port: the proxy would scrape"
            f" itself (got {proxy.port})"
        )
    if proxy.grpc_upstream_port is not None and proxy.grpc_upstream_port == proxy.port:
        problems.append(f"proxy.grpc_upstream_port: must differ from proxy.port (got {proxy.port})")
    if proxy.grpc_upstream_port is not None and transport.kind == "grpc":
        problems.append(
            "proxy.grpc_upstream_port: with runtime.transport.kind grpc the child serves"
            f" gRPC on docker_server.server_port; remove one (got {proxy.grpc_upstream_port})"
        )
    # without a usable secrets_dir every secret would be "missing": that is said once already
    if not any(problem.startswith("proxy.secrets_dir:") for problem in problems):
        for name in secrets:
            if missing := _missing_secret(proxy.secrets_dir / name):
                problems.append(f"secrets.{name}: {missing}")
        if proxy.api_key_secret:
            try:
                _load_secret(proxy.secrets_dir, proxy.api_key_secret)
            except ValueError as exc:
                problems.append(f"proxy.api_key_secret: {exc}")
    if problems:
        raise ConfigError(problems)
    return Config(
        model_name=model_name,
        docker_server=docker,
        predict_concurrency=concurrency,
        health_checks=health,
        transport=transport,
        proxy=proxy,
        environment_variables=MappingProxyType(environment),
        secrets=secrets,
        implementation=implementation,
        model_uri=model_uri,
        notes=tuple(notes),
    )


def render_config(config: Config) -> str:
    """The resolved configuration as YAML: every setting with its effective value."""
    data: dict[str, Any] = {"model_name": config.model_name}
    if config.implementation:  # docker_server below is the preset's, expanded
        data.update(implementation=config.implementation, model_uri=config.model_uri)
    data |= {
        "docker_server": _plain(config.docker_server),
        "runtime": {
            "predict_concurrency": config.predict_concurrency,
            "health_checks": _plain(config.health_checks),
            "transport": _plain(config.transport),
        },
        "environment_variables": dict(config.environment_variables),
        "secrets": list(config.secrets),
        "proxy": _plain(config.proxy),
    }
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=math.inf)


def read_secret(config: Config, name: str) -> str:
    """The secret file's content without surrounding whitespace; ConfigError if it cannot be
    read or is empty (an empty API key would let anyone in)."""
    try:
        return _load_secret(config.proxy.secrets_dir, name)
    except ValueError as exc:
        raise ConfigError([f"secrets.{name}: {exc}"]) from exc


def _top_level_keys(data: Mapping[Any, Any], problems: list[str]) -> list[str]:
    """Reports a key one typo away from a known one (`runtim`); the notes on the others that
    do nothing: Truss's keys model-proxy does not use, and keys neither knows."""
    notes = truss.unused(data, truss.TOP_LEVEL, "")
    for key, value in data.items():
        name = str(key)
        if name in _TOP_KEYS:
            continue
        if close := truss.typo_of(name, _TOP_KEYS):
            problems.append(f"{name}: unknown key; did you mean {close}? (got {show(value)})")
        else:
            notes.append(f"{name}: not a key of model-proxy or Truss: ignored")
    return notes


def _read_yaml(path: Path) -> Mapping[Any, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file ({_HOW_TO_CHOOSE})"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark, context = exc.problem_mark, exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context and context:  # e.g. where an unclosed quote began
            what = f"{what} ({exc.context} at line {context.line + 1})"
        raise ConfigError([f"{where}: invalid YAML: {what}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from exc
    if data is None:  # an empty file: report the required keys
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path}: the top level must be a mapping of keys (got {show(data)})"])
    return data


def _docker_from_preset(
    top: Section, model_name: str | None, presets_file: Path | None
) -> tuple[str | None, str | None, DockerServer, dict[str, Any]]:
    """docker_server, expanded from the server preset `implementation` names if it names one;
    with the preset's name, the model_uri it was given and the proxy settings it fills."""
    implementation = top.text("implementation")
    model_uri = top.text("model_uri") or None
    args = top.child("preset_args")
    raw = top.data.get("docker_server")
    registry = None
    if implementation or presets_file:  # a presets file is checked even while unused
        try:
            registry = presets.load_registry(presets_file)
        except ConfigError as error:
            top.problems.extend(f"proxy.presets_file: {problem}" for problem in error.problems)
    if not implementation:
        if model_uri is not None:
            top.fail("model_uri", "needs implementation: the server preset it is for", model_uri)
        if args.data:
            top.fail(
                "preset_args", "need implementation: the server preset they are for", args.data
            )
        return None, None, _docker_server(top.child("docker_server", known=_DOCKER_KEYS)), {}
    preset = registry and presets.find(registry, implementation)
    if registry is not None and preset is None:
        top.problems.append(f"implementation: {presets.unknown_preset(registry, implementation)}")
    if not preset or not isinstance(raw, Mapping | None):
        # said already (or said by _Section): check what the user wrote, without reporting
        # the keys the preset would have filled as missing
        section = Section(raw, "docker_server", top.problems, known=_DOCKER_KEYS)
        return None, None, _docker_server(section, complete=False), {}
    expanded, problems = presets.expand(
        preset,
        explicit=raw or {},
        model_uri=model_uri,
        model_name=model_name,
        preset_args=args.data,
    )
    top.problems.extend(problems)
    section = Section(
        expanded if not problems else raw, "docker_server", top.problems, known=_DOCKER_KEYS
    )
    docker = _docker_server(section, complete=not problems)
    return preset.name, model_uri, docker, preset.proxy_settings()


def _docker_server(section: Section, *, complete: bool = True) -> DockerServer:
    """`complete` False: a key the preset would have filled is not reported as missing."""
    return DockerServer(
        start_command=section.text("start_command", required=complete, nonempty=True),
        server_port=section.integer("server_port", None if complete else 0, low=1, high=65535),
        predict_endpoint=section.endpoint("predict_endpoint", required=complete, query=True),
        readiness_endpoint=section.endpoint("readiness_endpoint") or None,
        liveness_endpoint=section.endpoint("liveness_endpoint") or None,
        # Truss refuses 0 too: running as root is what happens without the key
        run_as_user_id=section.integer("run_as_user_id", 0, low=1) or None,
    )


def _health_checks(section: Section) -> HealthChecks:
    default = HealthChecks()
    section.seconds("restart_check_delay_seconds", 0.0)
    return HealthChecks(
        **{f.name: section.seconds(f.name, getattr(default, f.name)) for f in fields(default)}
    )


def _transport(section: Section) -> Transport:
    default = Transport()
    kind = section.choice("kind", _TRANSPORT_KINDS, default.kind)
    interval = section.timeout("ping_interval_seconds")
    timeout = section.timeout("ping_timeout_seconds")
    if kind != "websocket":
        for key in ("ping_interval_seconds", "ping_timeout_seconds"):
            if section.data.get(key) is not None:
                section.fail(key, "only applies with runtime.transport.kind websocket", kind)
    if timeout is not None and interval is None:
        section.fail("ping_timeout_seconds", "needs ping_interval_seconds set", timeout)
    return Transport(kind=kind, ping_interval_seconds=interval, ping_timeout_seconds=timeout)


def _presets_file(section: Section, base: Path) -> Path | None:
    """proxy.presets_file, relative to the config file's folder."""
    name = section.text("presets_file", nonempty=True)
    return base / name if name else None


def _proxy_settings(
    section: Section, concurrency: int, presets_file: Path | None, *, debug: bool
) -> ProxySettings:
    default = ProxySettings(max_queue_size=10 * concurrency)
    api_key_secret = section.text("api_key_secret", nonempty=True) or None
    if api_key_secret and not _is_file_name(api_key_secret):
        section.fail("api_key_secret", _NAME_RULE, api_key_secret)
        api_key_secret = None
    metrics_require_api_key = section.boolean(
        "metrics_require_api_key", default.metrics_require_api_key
    )
    if metrics_require_api_key and not section.data.get("api_key_secret"):
        section.fail("metrics_require_api_key", "needs proxy.api_key_secret set", True)
    return ProxySettings(
        host=section.text("host", nonempty=True) or default.host,
        port=section.integer("port", default.port, low=1, high=65535),
        max_queue_size=section.integer("max_queue_size", default.max_queue_size, low=0),
        queue_timeout_seconds=section.timeout("queue_timeout_seconds"),
        request_timeout_seconds=section.timeout("request_timeout_seconds"),
        max_request_body_bytes=section.integer(
            "max_request_body_bytes", default.max_request_body_bytes, low=1
        ),
        probe_interval_seconds=section.positive(
            "probe_interval_seconds", default.probe_interval_seconds
        ),
        drain_quiet_seconds=section.seconds("drain_quiet_seconds", default.drain_quiet_seconds),
        shutdown_grace_seconds=section.seconds(
            "shutdown_grace_seconds", default.shutdown_grace_seconds
        ),
        child_stop_grace_seconds=section.seconds(
            "child_stop_grace_seconds", default.child_stop_grace_seconds
        ),
        restart_policy=section.choice("restart_policy", _RESTART_POLICIES, default.restart_policy),
        secrets_dir=Path(section.text("secrets_dir", nonempty=True) or default.secrets_dir),
        api_key_secret=api_key_secret,
        metrics_require_api_key=metrics_require_api_key,
        log_format=section.choice("log_format", _LOG_FORMATS, default.log_format),
        log_level=section.choice("log_level", _LOG_LEVELS, "debug" if debug else default.log_level),
        access_log=section.boolean("access_log", default.access_log),
        presets_file=presets_file,
        client_header_timeout_seconds=section.positive(
            "client_header_timeout_seconds", default.client_header_timeout_seconds
        ),
        client_body_timeout_seconds=section.positive(
            "client_body_timeout_seconds", default.client_body_timeout_seconds
        ),
        client_send_timeout_seconds=section.positive(
            "client_send_timeout_seconds", default.client_send_timeout_seconds
        ),
        keepalive_timeout_seconds=section.positive(
            "keepalive_timeout_seconds", default.keepalive_timeout_seconds
        ),
        buffer_request_body_bytes=section.integer(
            "buffer_request_body_bytes", default.buffer_request_body_bytes, low=0
        ),
        websocket_idle_timeout_seconds=section.timeout(
            "websocket_idle_timeout_seconds", default.websocket_idle_timeout_seconds
        ),
        grpc_upstream_port=section.integer("grpc_upstream_port", 0, low=1, high=65535) or None,
        grpc_health_service=section.text("grpc_health_service") or default.grpc_health_service,
        upstream_metrics_endpoint=section.endpoint("upstream_metrics_endpoint", query=True) or None,
        upstream_metrics_port=section.integer("upstream_metrics_port", 0, low=1, high=65535)
        or None,
    )


def _environment(section: Section, notes: list[str]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for name, value in section.data.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            section.problems.append(
                f'environment_variables: names must be non-empty strings without "=" or NUL'
                f" (got {show(name)})"
            )
        elif value is None:  # Truss allows `KEY: null`: nothing to set
            notes.append(
                f"environment_variables.{name}: null, so not set (a secret belongs under"
                " secrets:, as a file in proxy.secrets_dir)"
            )
        elif isinstance(value, bool):  # YAML's true/false, as the shell would spell them
            environment[name] = "true" if value else "false"
        elif isinstance(value, str | int | float) and "\0" not in str(value):
            environment[name] = str(value)
        else:
            section.fail(name, "must be a string, number or boolean without NUL", value)
    return environment


def _secret_names(raw: object, problems: list[str]) -> tuple[str, ...]:
    # The values of Truss's `{name: null}` form are placeholders: never read, never shown.
    if raw is None:
        return ()
    if not isinstance(raw, Mapping | list):
        problems.append(
            "secrets: must be a mapping of names to null, or a list of names"
            f" (got a {type(raw).__name__})"
        )
        return ()
    names: dict[str, None] = {}
    for name in raw:
        if _is_file_name(name):
            names[name] = None
        else:
            problems.append(f"secrets: {_NAME_RULE} (got {show(name)})")
    return tuple(names)


def _missing_secret(file: Path) -> str | None:
    if file.is_file():
        return None
    if file.exists():
        return f"secret file {file} is not a regular file"
    return (
        f"secret file {file} is missing (create it, set proxy.secrets_dir to the directory"
        " that holds it, or remove the key)"
    )


def _load_secret(secrets_dir: Path, name: str) -> str:
    """The stripped content; ValueError saying why (never showing the content) if unusable."""
    if not _is_file_name(name):
        raise ValueError(f"{_NAME_RULE} (got {show(name)})")
    file = secrets_dir / name
    if missing := _missing_secret(file):
        raise ValueError(missing)
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"secret file {file} cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError:
        raise ValueError(f"secret file {file} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"secret file {file} is empty")
    return value


def _is_file_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and name not in ("", ".", "..") and not {"/", "\0"} & set(name)


def _plain(section: DockerServer | HealthChecks | Transport | ProxySettings) -> dict[str, Any]:
    values = {field.name: getattr(section, field.name) for field in fields(section)}
    return {
        name: str(value) if isinstance(value, Path) else value for name, value in values.items()
    }
