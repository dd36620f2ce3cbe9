"""build_support/image_install.py, the Dockerfile's install step: PROXY_COMPILE is checked
before anything runs, 1 fails where nothing can compile, and the probe tells a C toolchain that
builds an extension for this Python from a missing or a broken one. The install itself (uv,
mypyc, the fallback) is built and checked in an image by .ci/image-smoke."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT

INSTALL = ROOT / "build_support" / "image_install.py"


def image_install() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_install", INSTALL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_compiler = pytest.mark.skipif(
    shutil.which(image_install().compiler()[0]) is None,
    reason="no C compiler for this Python (.ci/compiled needs one too)",
)


def run_install(source: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INSTALL), str(source)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unknown_mode_is_refused_naming_the_choices(tmp_path: Path) -> None:
    run = run_install(tmp_path, PROXY_COMPILE="yes")

    assert run.returncode == 2
    assert "PROXY_COMPILE must be auto, 1 or 0 (got 'yes')" in run.stderr
    assert run.stdout == ""


def test_compile_1_fails_where_nothing_can_compile_before_installing(tmp_path: Path) -> None:
    run = run_install(tmp_path, PROXY_COMPILE="1", CC="no-such-cc")

    assert run.returncode == 1
    assert "cannot compile: no C compiler: no-such-cc is not on PATH" in run.stderr
    # refused before uv ran: nothing said about installing
    assert run.stdout == ""


@needs_compiler
def test_the_probe_builds_an_extension_with_this_pythons_compiler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CC", raising=False)
    assert image_install().compile_blocker() is None


def test_the_probe_names_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-cc -pthread")
    assert image_install().compile_blocker() == (
        "no C compiler: no-such-cc is not on PATH (Debian/Ubuntu: gcc)"
    )


@needs_compiler
def test_the_probe_reports_a_broken_compilers_first_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a compiler that runs and cannot build (as gcc without libc6-dev): its first error is why
    monkeypatch.delenv("CC", raising=False)
    compiler = image_install().compiler()
    monkeypatch.setenv("CC", shlex.join([*compiler, "-include", str(tmp_path / "absent.h")]))

    reason = image_install().compile_blocker()

    assert reason is not None
    assert reason.startswith(f"{compiler[0]} cannot build an extension against ")
    assert "absent.h" in reason
    assert "error" in reason
