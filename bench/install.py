"""Bring the tools the benchmark needs: nginx and wrk from Debian, matplotlib (and py-spy
for profiling) into this interpreter's virtualenv. Each is installed only when missing."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

# nginx-light has the http core, upstream keepalive, the proxy module, HTTP/2 and grpc_pass:
# all the bench needs; h2load (nghttp2) drives the gRPC load
DEBIAN_PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client"}


def ensure_debian_tools() -> None:
    missing = [package for command, package in DEBIAN_PACKAGES.items() if not shutil.which(command)]
    if not missing:
        return
    print(f"installing {', '.join(missing)} from Debian", flush=True)
    quiet = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=quiet)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=quiet,
    )
    # Debian starts the packaged nginx on :80 after install; the bench runs its own instances
    subprocess.run(["service", "nginx", "stop"], check=False, capture_output=True)


def ensure_python_package(module: str, package: str | None = None) -> None:
    if importlib.util.find_spec(module) is not None:
        return
    print(f"installing {package or module} into {sys.prefix}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package or module], check=True)
    importlib.invalidate_caches()


def py_spy() -> Path:
    """py-spy installed beside this interpreter (its wheel ships only the binary)."""
    binary = Path(sys.executable).parent / "py-spy"
    if not binary.exists():
        print(f"installing py-spy into {sys.prefix}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return binary


def ensure_all(*, profiler: bool = False) -> None:
    ensure_debian_tools()
    ensure_python_package("matplotlib")
    if profiler:
        py_spy()


if __name__ == "__main__":
    ensure_all(profiler="--profiler" in sys.argv[1:])
