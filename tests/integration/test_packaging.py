"""A built wheel (what a non-editable `pip install .` installs) carries the top-level config/
folder as the package proxy.registry, and the program finds its presets there; built with
MODEL_PROXY_COMPILE=1 (.ci/compiled), it carries the request path compiled by mypyc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..conftest import ROOT
from .conftest import SLOW

pytestmark = [pytest.mark.integration, SLOW]

# what the build reads; copied so that building leaves nothing in the work tree
SOURCES = ("pyproject.toml", "setup.py", "build_support", "README.md", "proxy", "config")

RUN_FROM_WHEEL = """\
import sys
sys.path.insert(0, sys.argv[1])  # ahead of the editable install
from proxy import cli, presets
assert presets.__file__.startswith(sys.argv[1]), presets.__file__
raise SystemExit(cli.main(["presets", "MLSERVER"]))
"""


def test_the_wheel_carries_the_registry_and_the_schema(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path, source],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("model_proxy-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    run = subprocess.run(
        [sys.executable, "-c", RUN_FROM_WHEEL, str(wheel)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert {"proxy/registry/servers.yaml", "proxy/registry/schema.json"} <= set(names)
    compiled = [name for name in names if name.startswith("proxy/protocol.") and ".so" in name]
    assert bool(compiled) == (os.environ.get("MODEL_PROXY_COMPILE") == "1"), names
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("MLSERVER  ")
    assert "/v2/models/{model_name}/ready" in run.stdout
