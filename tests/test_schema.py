"""config/schema.json: valid, true to proxy/config.py, and passed by every example config;
and the deployment examples (Kubernetes, Grafana) agree with the config and the metrics."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml

from proxy import presets
from proxy.config import (
    _DOCKER_KEYS,
    _HEALTH_KEYS,
    _PROXY_KEYS,
    _RUNTIME_KEYS,
    _TOP_KEYS,
    DockerServer,
    HealthChecks,
    ProxySettings,
    Transport,
    load_config,
)
from proxy.errors import ConfigError

from .conftest import ROOT, free_port, in_process_proxy

SCHEMA = json.loads((ROOT / "config" / "schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
KUBERNETES = ROOT / "examples" / "kubernetes"


def manifests() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def kind(name: str) -> dict[str, Any]:
    """The one manifest of that kind (ConfigMap: the model server's, not the adapter's)."""
    [found] = [
        document
        for document in manifests()
        if document["kind"] == name
        and not document["metadata"]["name"].startswith("prometheus-adapter")
    ]
    return found


def example_configs() -> dict[str, str]:
    """Every config.yaml in the repository, and those inside Kubernetes ConfigMaps."""
    found = {
        str(path.relative_to(ROOT)): path.read_text()
        for path in sorted(ROOT.glob("examples/**/config.yaml"))
    }
    for document in manifests():
        labels = document["metadata"].get("labels", {})
        if document["kind"] == "ConfigMap" and labels.get("app.kubernetes.io/component"):
            found[f"ConfigMap {document['metadata']['name']}"] = document["data"]["config.yaml"]
    return found


EXAMPLES = example_configs()


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_there_are_examples_of_every_kind() -> None:
    names = set(EXAMPLES)
    for example in ("echo", "mlserver", "seldon", "asgi", "vllm", "sglang", "infinity"):
        assert f"examples/{example}/config.yaml" in names
    assert "ConfigMap llm-config" in names


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_config_passes_the_schema_and_the_loader(tmp_path: Path, name: str) -> None:
    data = yaml.safe_load(EXAMPLES[name])

    VALIDATOR.validate(data)
    # the loader too, with its secret files made up in a folder of the test's
    proxy = data.setdefault("proxy", {}) or {}
    for secret in [*(data.get("secrets") or []), proxy.get("api_key_secret")]:
        if secret:
            (tmp_path / secret).write_text("made-up\n")
    data["proxy"] = {**proxy, "secrets_dir": str(tmp_path)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)

    assert config.docker_server.start_command
    assert (config.implementation is not None) == ("implementation" in data)
    # the model server listens on 127.0.0.1 only (the Seldon microservice cannot be told to)
    if config.implementation != "SELDON_MICROSERVICE":
        assert "127.0.0.1" in config.docker_server.start_command, name


def properties(*path: str) -> dict[str, Any]:
    node = SCHEMA
    for key in path:
        node = node["properties"][key]
    result: dict[str, Any] = node["properties"]
    return result


def test_the_schema_knows_exactly_the_proxy_keys_of_the_loader() -> None:
    assert set(properties("proxy")) == set(_PROXY_KEYS)
    assert set(properties("runtime", "health_checks")) == set(_HEALTH_KEYS)
    assert {f.name for f in dataclasses.fields(DockerServer)} <= set(properties("docker_server"))
    # Truss's sections too, and every top-level key (the schema lets others through)
    assert set(properties("docker_server")) == set(_DOCKER_KEYS)
    assert set(properties("runtime")) == set(_RUNTIME_KEYS)
    assert set(SCHEMA["properties"]) == set(_TOP_KEYS)


def test_the_schema_defaults_are_the_loaders() -> None:
    loader = ProxySettings(max_queue_size=10)  # max_queue_size has no fixed default
    for key, spec in properties("proxy").items():
        expected = getattr(loader, key)
        if key == "max_queue_size":
            assert "default" not in spec
            continue
        assert spec["default"] == (str(expected) if isinstance(expected, Path) else expected), key
    for key, spec in properties("runtime", "health_checks").items():
        assert spec["default"] == getattr(HealthChecks(), key, 0), key
    assert properties("runtime")["predict_concurrency"]["default"] == 1


def test_every_property_is_described_for_editors() -> None:
    def walk(node: dict[str, Any], where: str) -> list[str]:
        missing = []
        for key, spec in node.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{where}{key}")
            missing += walk(spec, f"{where}{key}.")
        return missing

    assert walk(SCHEMA, "") == []


def test_the_schema_offers_every_built_in_preset() -> None:
    [names] = [
        choice["enum"]
        for choice in SCHEMA["properties"]["implementation"]["anyOf"]
        if "enum" in choice
    ]
    assert names == list(presets.builtin_registry())


MINIMAL = {"docker_server": {"start_command": "s", "server_port": 8000, "predict_endpoint": "/"}}


@pytest.mark.parametrize(
    "change",
    [
        {"proxy": {"api_key": "x"}},
        {"proxy": {"port": 0}},
        {"proxy": {"restart_policy": "sometimes"}},
        {"proxy": {"drain_quiet_seconds": -1}},
        {"proxy": {"queue_timeout_seconds": 0}},
        {"proxy": {"api_key_secret": "a/b"}},
        {"runtime": {"predict_concurrency": 0}},
        {"runtime": {"health_checks": {"startup_seconds": 5}}},
        {"runtime": {"predict_concurency": 5}},
        {"runtime": {"transport": {"kind": "websocket", "ping_every": 5}}},
        {"docker_server": {**MINIMAL["docker_server"], "readyness_endpoint": "/health"}},
        {"docker_server": {**MINIMAL["docker_server"], "run_as_user_id": 0}},
        {"docker_server": {**MINIMAL["docker_server"], "predict_endpoint": "predict"}},
        {"docker_server": {**MINIMAL["docker_server"], "readiness_endpoint": "//evil/x"}},
        {"docker_server": {**MINIMAL["docker_server"], "liveness_endpoint": "/h?x=1"}},
        {"docker_server": {"start_command": "s", "server_port": 8000}},
        {"secrets": {"a/b": None}},
    ],
)
def test_schema_and_loader_reject_the_same_mistakes(tmp_path: Path, change: dict[str, Any]) -> None:
    data = {**MINIMAL, **change}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))

    assert not VALIDATOR.is_valid(data)
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_preset_config_needs_no_docker_server_in_the_schema() -> None:
    VALIDATOR.validate({"implementation": "VLLM", "model_uri": "m"})
    VALIDATOR.validate({"implementation": "MY_OWN", "model_uri": "m", "docker_server": None})
    assert not VALIDATOR.is_valid({"model_uri": "m"})


# --- the deployment examples


def test_the_kubernetes_deployment_fits_the_proxys_config() -> None:
    config = yaml.safe_load(kind("ConfigMap")["data"]["config.yaml"])
    pod = kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    drain = config["proxy"]

    # SIGKILL must not cut the drain short
    needed = (
        drain["drain_quiet_seconds"]
        + drain["shutdown_grace_seconds"]
        + drain["child_stop_grace_seconds"]
    )
    assert pod["terminationGracePeriodSeconds"] > needed
    startup = container["startupProbe"]
    assert (
        startup["periodSeconds"] * startup["failureThreshold"]
        > (config["runtime"]["health_checks"]["startup_threshold_seconds"])
    )
    assert startup["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "MODEL_PROXY_CONFIG", "value": "/app/config.yaml"} in container["env"]
    assert volumes[mounts["/app"]]["configMap"]["name"] == kind("ConfigMap")["metadata"]["name"]
    assert "secret" in volumes[mounts["/secrets"]]
    [port] = container["ports"]
    assert port["containerPort"] == config["proxy"]["port"]


def test_service_monitor_and_autoscaler_point_at_the_deployment() -> None:
    deployment = kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [port] = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    service, monitor, hpa = kind("Service"), kind("PodMonitor"), kind("HorizontalPodAutoscaler")
    adapter = yaml.safe_load(
        next(
            document["data"]["config.yaml"]
            for document in manifests()
            if document["metadata"]["name"].startswith("prometheus-adapter")
        )
    )
    [rule] = adapter["rules"]

    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0] == {
        "port": port["name"],
        "path": "/metrics",
        "interval": "15s",
    }
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "model_proxy_requests_in_flight" in rule["metricsQuery"]
    assert "model_proxy_requests_queued" in rule["metricsQuery"]


async def test_the_dashboard_queries_exactly_the_proxys_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "examples" / "grafana" / "dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    async with (
        in_process_proxy(tmp_path, free_port()) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics") as response,
    ):
        exposition = await response.text()
    families = dict(re.findall(r"^# TYPE (model_proxy_\w+) (\w+)$", exposition, re.MULTILINE))

    def sample_names(family: str, kind: str) -> set[str]:
        # (a counter's TYPE line already names it with _total)
        if kind == "histogram":
            return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        return {family}

    exposed = {name for family, kind in families.items() for name in sample_names(family, kind)}
    used = {name for expr in expressions for name in re.findall(r"model_proxy_\w+", expr)}

    assert used <= exposed, used - exposed
    # vLLM's own, when its metrics are merged (both names of its KV-cache gauge)
    vllm = {name for expr in expressions for name in re.findall(r"vllm:\w+", expr)}
    assert {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"} <= vllm
    assert "vllm:num_requests_waiting" in vllm
    # every family has a panel
    assert {
        family for family, kind in families.items() if sample_names(family, kind) & used
    } == set(families)


def test_the_readme_documents_every_key_the_proxy_reads() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Every key the proxy reads, with its default:")[1].split("\n\n")[1]
    documented = {
        key
        for row in section.splitlines()[2:]
        for key in re.findall(r"`([a-z_.]+)`", row.split("|")[1])
    }
    sections: dict[str, Any] = {
        "docker_server": DockerServer,
        "runtime.health_checks": HealthChecks,
        "runtime.transport": Transport,
        "proxy": ProxySettings,
    }
    read = {
        f"{prefix}.{field.name}"
        for prefix, settings in sections.items()
        for field in dataclasses.fields(settings)
    }
    read |= {"model_name", "implementation", "model_uri", "preset_args", "environment_variables"}
    read |= {"secrets", "runtime.predict_concurrency", "runtime.enable_debug_logs"}
    assert read <= documented, read - documented
