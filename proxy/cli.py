"""The command line: `model-proxy run`, `check` and `presets`; exit codes live here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from importlib import machinery
from pathlib import Path

import uvloop

from . import logs, presets, protocol
from .config import Config, load_config, render_config
from .errors import ConfigError
from .server import serve

EXIT_BAD_CONFIG = 2
EXIT_USAGE = 2  # argparse's own code for a command line it cannot use

log = logging.getLogger("model_proxy")


def version() -> str:
    # imported only when asked: importlib.metadata costs the running proxy ~2 MB for nothing
    from importlib import metadata

    try:
        number = metadata.version("model-proxy")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        number = "unknown (not installed)"
    return f"{number} ({build()})"


class _Version(argparse.Action):
    """--version, worked out only when asked (`run` never loads importlib.metadata)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and the build")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"model-proxy {version()}")
        parser.exit()


def build() -> str:
    """Which build runs: the request path compiled with mypyc (setup.py), or pure Python."""
    compiled = protocol.__file__ is not None and protocol.__file__.endswith(
        tuple(machinery.EXTENSION_SUFFIXES)
    )
    return "compiled with mypyc" if compiled else "pure Python"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-proxy",
        description="A sidecar that runs a model server and proxies traffic to it.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    default_config = os.environ.get("MODEL_PROXY_CONFIG", "config.yaml")
    run = commands.add_parser("run", help="start the model server and serve traffic")
    check = commands.add_parser("check", help="validate a config and print it resolved")
    for command in (run, check):
        command.add_argument(
            "--config",
            type=Path,
            default=Path(default_config),
            help="config.yaml to use (default: $MODEL_PROXY_CONFIG, else ./config.yaml)",
        )
    run.add_argument("--host", help="listen address (overrides proxy.host)")
    run.add_argument("--port", type=int, help="listen port (overrides proxy.port)")
    listing = commands.add_parser("presets", help="list the server presets for implementation:")
    listing.add_argument("name", nargs="?", help="show only this preset")
    listing.add_argument(
        "--file", type=Path, help="a registry of your own to add, as proxy.presets_file does"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `model-proxy` alone: what can it do?
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "presets":
        return _presets(args.name, args.file)
    try:
        config = load_config(
            args.config, host=getattr(args, "host", None), port=getattr(args, "port", None)
        )
    except ConfigError as error:
        print(f"model-proxy: {args.config} is not a valid configuration:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.command == "check":
        for note in config.notes:
            print(f"note: {note}", file=sys.stderr)
        sys.stdout.write(render_config(config))
        return 0
    return _run(config)


def _presets(name: str | None, file: Path | None) -> int:
    try:
        registry = presets.load_registry(file)
    except ConfigError as error:
        print(f"model-proxy: {file} is not a valid presets file:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    chosen = list(registry.values())
    if name is not None:
        if (preset := presets.find(registry, name)) is None:
            print(f"model-proxy: {presets.unknown_preset(registry, name)}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        chosen = [preset]
    sys.stdout.write("\n\n".join(presets.describe(preset) for preset in chosen) + "\n")
    return 0


def _run(config: Config) -> int:
    settings = config.proxy
    with (
        logs.configured(settings.log_format, logs.LEVELS[settings.log_level], config.model_name),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        for note in config.notes:
            log.info("note: %s", note)
        return runner.run(serve(config))
