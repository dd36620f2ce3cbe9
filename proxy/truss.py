"""What model-proxy knows of Truss's config.yaml beyond the keys it reads: the keys that have
no effect here and why, and which unknown top-level keys are typos of known ones."""

from __future__ import annotations

from collections.abc import Collection, Mapping

# Why a key has no effect; each note a user reads once, so it says where the setting went.
_BUILD = "it shapes the image Truss builds; model-proxy runs in an image already built"
_WEIGHTS = "Baseten downloads these before the start; here the model server fetches its own"
_PLATFORM = "a setting of Baseten's platform"
_TRUSS_MODEL = "it is for Truss's own Python model server; docker_server replaces that"
_DOCS = "documentation only"

# Truss's top-level keys that model-proxy accepts and does not use (truss/base/truss_config.py,
# TrussConfig, current and older releases), each with the reason it has no effect here.
TOP_LEVEL: Mapping[str, str] = {
    "description": _DOCS,
    "model_metadata": "Baseten shows it and Truss models read it; a docker_server never sees it",
    "examples_filename": _TRUSS_MODEL,
    "spec_version": _DOCS,
    "base_image": _BUILD,
    "python_version": _BUILD,
    "requirements": _BUILD,
    "requirements_file": _BUILD,
    "system_packages": _BUILD,
    "build_commands": _BUILD,
    "build": _BUILD,
    "external_package_dirs": _BUILD,
    "bundled_packages_dir": _BUILD,
    "data_dir": _BUILD,
    "external_data": _BUILD,
    "use_local_src": _BUILD,
    "use_local_chains_src": _BUILD,
    "apply_library_patches": _BUILD,
    "model_cache": _WEIGHTS,
    "hf_cache": _WEIGHTS,
    "weights": _WEIGHTS,
    "training_checkpoints": _WEIGHTS,
    "cache_internal": _WEIGHTS,
    "resources": "the hardware Baseten schedules the model on; here the container's limits apply",
    "model_class_name": _TRUSS_MODEL,
    "model_class_filename": _TRUSS_MODEL,
    "model_module_dir": _TRUSS_MODEL,
    "model_framework": _TRUSS_MODEL,
    "model_type": _TRUSS_MODEL,
    "input_type": _TRUSS_MODEL,
    "live_reload": _TRUSS_MODEL,
    "trt_llm": _TRUSS_MODEL,
    "bis_llm": _TRUSS_MODEL,
    "train": _TRUSS_MODEL,
}
DOCKER_SERVER: Mapping[str, str] = {
    "no_build": _BUILD,
    "setup_command": _BUILD,
}
RUNTIME: Mapping[str, str] = {
    "streaming_read_timeout": (
        "a stream that started is never cut; proxy.request_timeout_seconds bounds the wait for"
        " its start"
    ),
    "enable_tracing_data": (
        "traceparent and tracestate headers reach the model server untouched; the proxy"
        " exports no traces"
    ),
    "is_websocket_endpoint": "WebSockets are bridged whatever it says (see runtime.transport)",
    "num_workers": "the model server's own workers are its business; see predict_concurrency",
    "oidc": _PLATFORM,
    "remote_ssh": _PLATFORM,
    "egress_restrictions": _PLATFORM,
    "truss_server_version_override": _TRUSS_MODEL,
}
HEALTH_CHECKS: Mapping[str, str] = {
    "restart_check_delay_seconds": (
        "liveness is probed from the moment the server is ready, and restart_threshold_seconds"
        " bounds how long it may fail"
    ),
}


def unused(data: Mapping[object, object], ignored: Mapping[str, str], where: str) -> list[str]:
    """A note per key of `data` in `ignored` that sets something (null, false and empty
    ask for nothing: nothing to say)."""
    return [
        f"{where}{key}: no effect in model-proxy ({ignored[key]})"
        for key, value in data.items()
        if isinstance(key, str) and key in ignored and _sets_something(value)
    ]


def _sets_something(value: object) -> bool:
    if value is None or value is False:
        return False
    return not isinstance(value, str | list | dict) or bool(value)


def typo_of(key: str, known: Collection[str]) -> str | None:
    """The known key `key` is one typo away from (a character added, dropped, changed or two
    swapped), if any."""
    for candidate in known:
        if _one_edit_apart(key, candidate):
            return candidate
    return None


def _one_edit_apart(a: str, b: str) -> bool:
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    start = 0  # the first position where they differ
    while start < len(a) and a[start] == b[start]:
        start += 1
    if len(a) < len(b):  # one character more in b
        return a[start:] == b[start + 1 :]
    if a[start + 1 :] == b[start + 1 :]:  # one character changed
        return True
    swapped = start + 1 < len(a) and a[start] == b[start + 1] and a[start + 1] == b[start]
    return swapped and a[start + 2 :] == b[start + 2 :]
