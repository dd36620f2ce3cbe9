"""A built wheel (what a non-editable `pip install .` installs) carries the top-level config/
folder as the package proxy.registry, and the program finds its presets there; built with
MODEL_PROXY_COMPILE=1 (.ci/compiled), it carries the request path compiled by mypyc."""

from __future__ import annotations

import json
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


def test_the_build_asks_for_mypyc_only_for_a_compiled_wheel() -> None:
    """MODEL_PROXY_COMPILE=1 adds mypy to a wheel's build requirements; an editable install
    is never compiled (an extension beside its .py would hide every later edit)."""
    ask = (
        "import json, sys; sys.path.insert(0, 'build_support'); import backend; "
        "print(json.dumps([backend.get_requires_for_build_wheel(),"
        " backend.get_requires_for_build_editable()]))"
    )
    answers = {}
    for compile_flag in ("0", "1"):
        env = {**os.environ, "MODEL_PROXY_COMPILE": compile_flag}
        done = subprocess.run(
            [sys.executable, "-c", ask], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        answers[compile_flag] = json.loads(done.stdout.splitlines()[-1])
    wheel, editable = answers["1"]
    assert any(name.startswith("mypy") for name in wheel)
    assert not any(name.startswith("mypy") for name in editable)
    assert not any(name.startswith("mypy") for name in answers["0"][0] + answers["0"][1])
