"""setuptools' build backend, asking for mypy (mypyc) only when MODEL_PROXY_COMPILE=1 asks for
the compiled build (setup.py): a plain `pip install .` downloads nothing more."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403  (the backend's whole interface)

_COMPILER = ["mypy>=1.10"]
Settings = dict[str, Any] | None


def _compiler() -> list[str]:
    return _COMPILER if os.environ.get("MODEL_PROXY_COMPILE") == "1" else []


def _asking(ask: Callable[[Settings], list[str]], config_settings: Settings) -> list[str]:
    """setuptools runs setup.py to answer: tell it that mypyc is not there yet."""
    os.environ["MODEL_PROXY_ASKING_REQUIREMENTS"] = "1"
    try:
        return [*ask(config_settings), *_compiler()]
    finally:
        del os.environ["MODEL_PROXY_ASKING_REQUIREMENTS"]


def get_requires_for_build_wheel(config_settings: Settings = None) -> list[str]:
    return _asking(build_meta.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings: Settings = None) -> list[str]:
    return _asking(build_meta.get_requires_for_build_editable, config_settings)
