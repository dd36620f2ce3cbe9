"""Server presets: the registry (built-in plus a user's file) and the expansion of
`implementation` + `model_uri` (+ `preset_args`) into `docker_server` settings, and the
proxy settings a server calls for (where its own Prometheus metrics are)."""

from __future__ import annotations

import difflib
import json
import re
import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from proxy.errors import ConfigError

BUILT_IN = "built-in"
# the values every template may use besides an entry's own args
PORT, MODEL_URI, MODEL_NAME, EXTRA_ARGS = "port", "model_uri", "model_name", "extra_args"
_BUILT_IN_VALUES = (PORT, MODEL_URI, MODEL_NAME)
_TEMPLATES = ("start_command", "predict_endpoint", "readiness_endpoint", "liveness_endpoint")
_METRICS_KEYS = ("metrics_endpoint", "metrics_port")
_ENTRY_KEYS = ("description", "docs", "server_port", "args", *_TEMPLATES, *_METRICS_KEYS)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_SHOW_MAX = 80


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """One registry entry: how a known server starts and where it answers."""

    name: str
    description: str
    start_command: str
    server_port: int
    predict_endpoint: str
    readiness_endpoint: str | None = None
    liveness_endpoint: str | None = None
    # an arg's default; None: the user must give it in preset_args
    args: Mapping[str, str | None] = field(default_factory=dict)
    # the server's own Prometheus endpoint, and its port when not server_port's
    metrics_endpoint: str | None = None
    metrics_port: int | None = None
    docs: str | None = None
    source: str = BUILT_IN

    def templates(self) -> dict[str, str]:
        """The docker_server keys this preset fills, as templates."""
        return {key: value for key in _TEMPLATES if (value := getattr(self, key)) is not None}

    def proxy_settings(self) -> dict[str, Any]:
        """The proxy: keys this preset fills where the config does not name them."""
        if self.metrics_endpoint is None:
            return {}
        return {
            "upstream_metrics_endpoint": self.metrics_endpoint,
            "upstream_metrics_port": self.metrics_port,
        }


def builtin_registry() -> dict[str, Preset]:
    """The presets shipped in config/servers.yaml (installed as the package proxy.registry)."""
    source = resources.files("proxy.registry").joinpath("servers.yaml")
    return _parse(source.read_text(encoding="utf-8"), BUILT_IN)


def load_registry(user_file: Path | None = None) -> dict[str, Preset]:
    """The built-in presets, then `user_file`'s: an entry of the same name replaces the
    built-in one. ConfigError with every problem, each prefixed by the file's path."""
    registry = builtin_registry()
    if user_file is not None:
        try:
            text = user_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"{user_file}: no such presets file"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{user_file}: cannot read ({exc})"]) from exc
        registry.update(_parse(text, str(user_file)))
    return registry


def describe(preset: Preset) -> str:
    """The preset as `model-proxy presets` lists it: name, port, endpoints, start template."""
    lines = [f"{preset.name}  {preset.description}"]
    rows = {
        "port": str(preset.server_port),
        "predict": preset.predict_endpoint,
        "readiness": preset.readiness_endpoint or "(the port accepts TCP)",
        "liveness": preset.liveness_endpoint or "(the process runs)",
        "start": preset.start_command,
    }
    if preset.metrics_endpoint:
        port = "" if preset.metrics_port is None else f"port {preset.metrics_port}, "
        rows["metrics"] = f"{port}{preset.metrics_endpoint}"
    if preset.args:
        rows["args"] = ", ".join(
            arg if default is None else f"{arg}={default}" for arg, default in preset.args.items()
        )
    if preset.docs:
        rows["docs"] = preset.docs
    if preset.source != BUILT_IN:
        rows["from"] = preset.source
    lines += [f"  {key:<10} {value}" for key, value in rows.items()]
    return "\n".join(lines)


def find(registry: Mapping[str, Preset], implementation: str) -> Preset | None:
    """The preset named `implementation`, whatever its case."""
    return registry.get(implementation.upper())


def unknown_preset(registry: Mapping[str, Preset], implementation: str) -> str:
    """What to tell a user whose `implementation` names no preset."""
    close = difflib.get_close_matches(implementation.upper(), list(registry), n=1)
    hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(registry)}"
    return f"unknown server preset; {hint} (got {_show(implementation)})"


def expand(
    preset: Preset,
    *,
    explicit: Mapping[str, Any],
    model_uri: str | None,
    model_name: str | None,
    preset_args: Mapping[Any, Any],
) -> tuple[dict[str, Any], list[str]]:
    """The docker_server mapping: the preset's rendered templates, then every non-null key of
    `explicit` (the config's own docker_server) over them. Also the problems found, as
    `dotted.path: what (got X)` lines; the mapping is unusable when there are any."""
    problems: list[str] = []
    templates = {k: v for k, v in preset.templates().items() if explicit.get(k) is None}
    args: dict[str, str] = {}
    for key, value in preset_args.items():
        allowed = (*preset.args, MODEL_NAME, EXTRA_ARGS)
        if key not in allowed:
            problems.append(
                f"preset_args.{key}: unknown argument of {preset.name}; expected one of"
                f" {', '.join(allowed)} (got {_show(value)})"
            )
        elif value is None:  # null means "the default", as everywhere in config.yaml
            continue
        elif (text := _arg_text(value)) is None:
            problems.append(
                f"preset_args.{key}: must be a string, number or boolean (got {_show(value)})"
            )
        else:
            args[key] = text
    extra_args = args.pop(EXTRA_ARGS, None)
    if extra_args is not None and "start_command" not in templates:
        problems.append(
            "preset_args.extra_args: has no effect: docker_server.start_command replaces the"
            f" preset's (got {_show(extra_args)})"
        )

    port = explicit.get("server_port")
    valid_port = isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535
    values: dict[str, str | None] = {**preset.args, MODEL_URI: model_uri, MODEL_NAME: model_name}
    values.update(args)
    values[PORT] = str(port if valid_port else preset.server_port)
    needed = {name for template in templates.values() for name, _ in _fields(template)}
    for name in sorted(needed):
        if values.get(name) is None:
            problems.append(_missing(preset, name))
    if problems:
        return {}, problems

    expanded: dict[str, Any] = {"server_port": preset.server_port}
    for key, template in templates.items():
        if key == "start_command":
            expanded[key] = _render(template, values, _shell)
            if extra_args:
                expanded[key] = f"{expanded[key]} {extra_args}"
        else:
            expanded[key] = _render(template, values, _path)
    expanded.update({k: v for k, v in explicit.items() if v is not None})
    return expanded, problems


def _missing(preset: Preset, name: str) -> str:
    if name == MODEL_URI:
        return f"model_uri: required by implementation {preset.name}"
    if name == MODEL_NAME:
        return (
            f"preset_args.model_name: required by implementation {preset.name}"
            " (or set the top-level model_name)"
        )
    return f"preset_args.{name}: required by implementation {preset.name}"


def _arg_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float) and "\0" not in str(value):
        return str(value)
    return None


def _fields(template: str) -> list[tuple[str, str]]:
    """(name, format spec) of each placeholder; ValueError if the template is malformed."""
    found = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not _NAME.match(name) or conversion is not None:
            raise ValueError(f"{{{name}}} is not a plain {{name}} placeholder")
        found.append((name, spec or ""))
    return found


def _render(template: str, values: Mapping[str, str | None], quote_value: Any) -> str:
    out = []
    for literal, name, spec, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(quote_value(str(values[name]), spec or ""))
    return "".join(out)


def _shell(value: str, spec: str) -> str:
    if spec == "json":
        # a JSON string that is safe inside '...': JSON never needs a raw single quote
        return json.dumps(value).replace("'", "\\u0027")
    return shlex.quote(value)


def _path(value: str, spec: str) -> str:
    return quote(value, safe="")


def _parse(text: str, source: str) -> dict[str, Preset]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    servers = data.get("servers") if isinstance(data, Mapping) else None
    if not isinstance(servers, Mapping):
        raise ConfigError([f"{source}: must be a mapping with a `servers:` mapping of presets"])
    problems: list[str] = []
    presets: dict[str, Preset] = {}
    for name, entry in servers.items():
        where = f"{source}: servers.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"{where}: a preset name is letters, digits and _ (got {_show(name)})")
        elif not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a mapping (got {_show(entry)})")
        elif preset := _entry(name.upper(), entry, source, where, problems):
            presets[preset.name] = preset
    if problems:
        raise ConfigError(problems)
    return presets


def _entry(
    name: str, entry: Mapping[Any, Any], source: str, where: str, problems: list[str]
) -> Preset | None:
    before = len(problems)

    def fail(key: str, what: str) -> None:
        problems.append(f"{where}.{key}: {what} (got {_show(entry.get(key))})")

    for key in entry:
        if key not in _ENTRY_KEYS:
            problems.append(f"{where}.{key}: unknown key; expected one of {', '.join(_ENTRY_KEYS)}")
    for key in ("description", "start_command", "predict_endpoint"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            fail(key, "required, a non-empty string")
    for key in ("docs", "readiness_endpoint", "liveness_endpoint", "metrics_endpoint"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            fail(key, "must be a string")
    port = entry.get("server_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        fail("server_port", "required, an integer between 1 and 65535")
        port = 0
    metrics_endpoint = entry.get("metrics_endpoint")
    if isinstance(metrics_endpoint, str) and not metrics_endpoint.startswith("/"):
        fail("metrics_endpoint", 'must start with "/"')
    metrics_port = entry.get("metrics_port")
    if metrics_port is not None and not _is_port(metrics_port):
        fail("metrics_port", "must be an integer between 1 and 65535")
    elif metrics_port is not None and metrics_endpoint is None:
        fail("metrics_port", "needs metrics_endpoint")
    raw_args = entry.get("args") or {}
    args: dict[str, str | None] = {}
    if not isinstance(raw_args, Mapping):
        fail("args", "must be a mapping of names to defaults (null: required)")
        raw_args = {}
    for arg, default in raw_args.items():
        reserved = (*_BUILT_IN_VALUES, EXTRA_ARGS)
        if not isinstance(arg, str) or not _NAME.match(arg) or arg in reserved:
            problems.append(
                f"{where}.args: a name is letters, digits and _, and not one of"
                f" {', '.join(reserved)} (got {_show(arg)})"
            )
        elif default is not None and _arg_text(default) is None:
            problems.append(f"{where}.args.{arg}: must be a string, number, boolean or null")
        else:
            args[arg] = None if default is None else _arg_text(default)
    for key in _TEMPLATES:
        template = entry.get(key)
        if not isinstance(template, str):
            continue
        if key != "start_command" and not template.startswith("/"):
            fail(key, 'must start with "/"')
        try:
            fields = _fields(template)
        except ValueError as exc:
            fail(key, f"bad template: {exc}")
            continue
        for placeholder, spec in fields:
            if placeholder not in (*_BUILT_IN_VALUES, *args):
                fail(key, f"unknown placeholder {{{placeholder}}}")
            elif spec and (key != "start_command" or spec != "json"):
                fail(key, f"unknown format {{{placeholder}:{spec}}}")
    if len(problems) > before:
        return None
    return Preset(
        name=name,
        description=" ".join(entry["description"].split()),
        start_command=entry["start_command"].strip(),
        server_port=port,
        predict_endpoint=entry["predict_endpoint"],
        readiness_endpoint=entry.get("readiness_endpoint"),
        liveness_endpoint=entry.get("liveness_endpoint"),
        args=args,
        metrics_endpoint=metrics_endpoint,
        metrics_port=metrics_port,
        docs=entry.get("docs"),
        source=source,
    )


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."
