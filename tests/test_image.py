"""The Dockerfile agrees with what documents and builds it: the README's Container image
section, .ci/image-smoke, and a stop timeout that outlasts the drain."""

from __future__ import annotations

import json
import re

from proxy.config import load_config

from .conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
IMAGE_SMOKE = (ROOT / ".ci" / "image-smoke").read_text()


def build_arguments() -> dict[str, str]:
    """Every ARG of the Dockerfile with its default."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, flags=re.MULTILINE))


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def test_every_build_argument_is_documented_with_its_default() -> None:
    arguments = build_arguments()
    assert {"BASE_IMAGE", "CONFIG", "PROXY_PYTHON", "PROXY_COMPILE", "UV_IMAGE", "PROXY_UID"} <= (
        arguments.keys()
    )
    # only ARG NAME=DEFAULT lines: a bare ARG would be missed by build_arguments()
    assert len(arguments) == len(re.findall(r"^ARG ", DOCKERFILE, flags=re.MULTILINE))
    section = readme_section("Container image")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.MULTILINE))
    assert rows == arguments


def test_the_ca_bundle_secret_is_mounted_and_documented() -> None:
    # mounted for the install step, which hands it to uv; never copied into a layer
    assert "--mount=type=secret,id=ca-bundle" in DOCKERFILE
    assert "export SSL_CERT_FILE=/run/secrets/ca-bundle" in DOCKERFILE
    section = readme_section("Container image")
    assert "--secret id=ca-bundle,src=" in section
    assert "--build-arg PROXY_PYTHON=/usr/bin/python3" in section


def test_image_smoke_sets_only_build_arguments_the_dockerfile_declares() -> None:
    used = set(re.findall(r'--build-arg "?(\w+)=', IMAGE_SMOKE))
    assert {"BASE_IMAGE", "UV_IMAGE", "PROXY_PYTHON", "CONFIG", "PROXY_COMPILE"} <= used
    assert used <= build_arguments().keys()
    assert "id=ca-bundle," in IMAGE_SMOKE
    # the script makes the uv image for the version the Dockerfile's default names
    assert re.search(r"^ARG UV_IMAGE=\S+:[0-9][0-9.]*$", DOCKERFILE, flags=re.MULTILINE)
    assert (ROOT / build_arguments()["CONFIG"]).is_file()


def test_the_readme_says_how_to_tell_which_build_an_image_runs() -> None:
    # the compiled build is what CI builds and checks; the README's command calls the binary
    # the image's entrypoint runs
    assert "--build-arg PROXY_COMPILE=1" in IMAGE_SMOKE
    assert "(compiled with mypyc)" in IMAGE_SMOKE
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, flags=re.MULTILINE)
    assert entrypoint is not None
    binary = json.loads(entrypoint.group(1))[0]
    section = readme_section("Container image")
    assert f"--entrypoint {binary} my-model --version" in section
    assert "(compiled with mypyc)" in section
    assert "(pure Python)" in section


def test_the_documented_stop_timeout_outlasts_the_drain() -> None:
    # the drain: up to shutdown_grace_seconds after SIGTERM, then up to child_stop_grace_seconds
    # for the model server; SIGKILL must come later than both (README, Container image)
    settings = load_config(ROOT / "examples" / "echo" / "config.yaml").proxy
    drain = settings.shutdown_grace_seconds + settings.child_stop_grace_seconds
    section = readme_section("Container image")
    timeouts = [
        int(seconds) for seconds in re.findall(r"(?:--stop-timeout|docker stop -t) (\d+)", section)
    ]
    assert len(timeouts) >= 2
    assert all(seconds > drain for seconds in timeouts)
    stop = re.search(r"podman stop --time (\d+)", IMAGE_SMOKE)
    assert stop is not None
    assert int(stop.group(1)) > drain
