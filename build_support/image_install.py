"""The Dockerfile's install step: model-proxy into the virtualenv of the Python that runs this
file, its request path compiled with mypyc (setup.py) as PROXY_COMPILE asks.

    PROXY_COMPILE=auto /opt/model-proxy/venv/bin/python image_install.py SOURCE_DIR

auto: compiled where this image can build a C extension for this Python (a C compiler and
its Python.h), pure Python otherwise, saying why; 1: compiled, or the build fails; 0: pure
Python. Either way `model-proxy --version` must then name the build that was asked for.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

MODES = ("auto", "1", "0")
COMPILED = "(compiled with mypyc)"
PURE = "(pure Python)"
PROBE = "#include <Python.h>\nPyObject *probe(void) { return PyLong_FromLong(1); }\n"


def say(line: str) -> None:
    print(f"model-proxy image: {line}", flush=True)


def compiler() -> list[str]:
    """The C compiler setuptools will call: $CC, else the one this Python was built with."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def compile_blocker() -> str | None:
    """Why this Python cannot build a C extension here, or None when it can: a tiny extension
    that includes Python.h is compiled and linked as setuptools would."""
    command = compiler()
    if not command or shutil.which(command[0]) is None:
        name = command[0] if command else "$CC"
        return f"no C compiler: {name} is not on PATH (Debian/Ubuntu: gcc)"
    paths = sysconfig.get_paths()
    include, platinclude = paths["include"], paths["platinclude"]
    if not Path(include, "Python.h").is_file():
        return (
            f"no headers for this Python: {include}/Python.h is missing (Debian/Ubuntu: "
            f"python3-dev; uv's Python, PROXY_PYTHON=3.x, has them)"
        )
    with tempfile.TemporaryDirectory() as work:
        source = Path(work, "probe.c")
        source.write_text(PROBE)
        probe = [*command, "-shared", "-fPIC", f"-I{include}", f"-I{platinclude}"]
        built = subprocess.run(
            [*probe, str(source), "-o", str(Path(work, "probe.so"))],
            capture_output=True,
            text=True,
            check=False,
        )
    if built.returncode != 0:
        lines = [line.strip() for line in built.stderr.splitlines() if line.strip()]
        first = [line for line in lines if "error" in line] or lines
        reason = first[0] if first else f"exit status {built.returncode}"
        return f"{command[0]} cannot build an extension against {include}/Python.h: {reason}"
    return None


def install(source: str, *, compiled: bool) -> bool:
    """uv installs the project and its dependencies into this virtualenv."""
    env = {**os.environ, "MODEL_PROXY_COMPILE": "1" if compiled else "0"}
    command = ["uv", "pip", "install", "--no-cache", "--compile-bytecode"]
    return subprocess.run([*command, "--python", sys.executable, source], env=env).returncode == 0


def main(argv: list[str]) -> int:
    mode = os.environ.get("PROXY_COMPILE", "auto")
    if len(argv) != 1:
        print("usage: PROXY_COMPILE=auto|1|0 python image_install.py SOURCE_DIR", file=sys.stderr)
        return 2
    if mode not in MODES:
        print(
            f"model-proxy image: PROXY_COMPILE must be auto, 1 or 0 (got {mode!r})", file=sys.stderr
        )
        return 2
    source = argv[0]

    blocker = compile_blocker() if mode != "0" else "PROXY_COMPILE=0"
    if blocker is not None and mode == "1":
        print(
            f"model-proxy image: PROXY_COMPILE=1 asks for the compiled build, and this image "
            f"cannot compile: {blocker}. Build on a base image with a C compiler and the "
            "headers of PROXY_PYTHON, or with PROXY_COMPILE=auto (pure Python where it cannot "
            "compile).",
            file=sys.stderr,
        )
        return 1
    compiled = blocker is None
    if compiled:
        say(f"compiling the request path with mypyc ({shlex.join(compiler())})")
        started = time.monotonic()
        if install(source, compiled=True):
            say(f"compiled and installed in {time.monotonic() - started:.0f} s")
        elif mode == "1":
            print("model-proxy image: the compiled build failed (above)", file=sys.stderr)
            return 1
        else:
            say("the compiled build failed (above): installing pure Python (PROXY_COMPILE=auto)")
            compiled = False
            # setuptools would pack whatever extension it did build there into the pure wheel
            shutil.rmtree(Path(source, "build"), ignore_errors=True)
            if not install(source, compiled=False):
                return 1
    else:
        say(f"installing pure Python: {blocker}")
        if not install(source, compiled=False):
            return 1

    # the build that runs is the one the program reports, not the one asked for
    expected = COMPILED if compiled else PURE
    reported = subprocess.run(
        [str(Path(sys.executable).parent / "model-proxy"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = reported.stdout.strip()
    if reported.returncode != 0 or not version.endswith(expected):
        print(
            f"model-proxy image: model-proxy --version should end {expected}: "
            f"{version or reported.stderr.strip()}",
            file=sys.stderr,
        )
        return 1
    say(f"installed {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
