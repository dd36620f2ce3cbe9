"""setuptools' build backend, asking for mypy (mypyc) and the dependencies it type-checks
against only when MODEL_PROXY_COMPILE=1 asks for the compiled build (setup.py): a plain
`pip install .` downloads nothing more. An editable install is never compiled: an extension
beside its .py would hide every later edit of it."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the backend's whole interface)

_COMPILER = ["mypy>=1.10", "types-PyYAML"]
Settings = dict[str, Any] | None


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """setup.py runs in this process: it reads what it is asked through the environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _compiling() -> bool:
    return os.environ.get("MODEL_PROXY_COMPILE") == "1"


def _compiler() -> list[str]:
    """mypyc type-checks what it compiles against the project's dependencies (strict, as in
    development): an isolated build environment needs them as well as mypy itself."""
    with open("pyproject.toml", "rb") as project:
        dependencies: list[str] = tomllib.load(project)["project"]["dependencies"]
    return [*_COMPILER, *dependencies]


def get_requires_for_build_wheel(config_settings: Settings = None) -> list[str]:
    compiler = _compiler() if _compiling() else []
    # setup.py runs to answer, before mypyc is there: it is told so
    with _environment(MODEL_PROXY_ASKING_REQUIREMENTS="1"):
        return [*build_meta.get_requires_for_build_wheel(config_settings), *compiler]


def get_requires_for_build_editable(config_settings: Settings = None) -> list[str]:
    with _environment(MODEL_PROXY_COMPILE="0"):
        return build_meta.get_requires_for_build_editable(config_settings)


def build_editable(
    wheel_directory: str, config_settings: Settings = None, metadata_directory: str | None = None
) -> str:
    build: Callable[..., str] = build_meta.build_editable
    with _environment(MODEL_PROXY_COMPILE="0"):
        return build(wheel_directory, config_settings, metadata_directory)


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: Settings = None
) -> str:
    prepare: Callable[..., str] = build_meta.prepare_metadata_for_build_editable
    with _environment(MODEL_PROXY_COMPILE="0"):
        return prepare(metadata_directory, config_settings)
