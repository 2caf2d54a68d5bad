"""cluster/: the KubeRay manifests are generated, valid against their schemas, and safe.

- Generated files equal what ``python -m serve_app.cluster render-all`` produces (its ``--check``).
- RayService and its ``rayClusterConfig`` (as a RayCluster) validate against KubeRay's CRD
  openAPIV3 schemas from ``../shared/kuberay/``, plus a strict walk that rejects any key the
  schema does not list (CRD schemas do not forbid unknown keys; the API server prunes them
  silently, so a typo would pass ``kubectl apply`` and do nothing).
- Core objects, and every pod template inside the RayService, validate strictly against the
  Kubernetes OpenAPI schemas shipped by ``kubernetes-validate`` (offline, pinned K8S_VERSION).
- ``kubectl kustomize`` (or ``kustomize``) builds both overlays when the binary is present;
  otherwise a structural check (every referenced file exists and parses) runs instead.
- Secrets never in serveConfigV2 / runtime_env / user_config; securityContext everywhere;
  terminationGracePeriodSeconds above every graceful_shutdown_timeout_s; the timeout ladder.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serve_app import cluster as gen

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "kuberay"
K8S_VERSION = "1.32"
OVERLAYS = ("dev", "production")
SERVE_CONFIGS = {"base": "configs/production.yaml", "dev": "configs/dev-k8s.yaml", "production": "configs/production.yaml"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if isinstance(d, dict)]


# ----------------------------------------------------------------------------- generated files


def test_generated_files_match_the_generator() -> None:
    """The committed manifests are exactly what the generator makes from their sources."""
    for rel, text in gen.render_targets(REPO).items():
        assert (REPO / rel).read_text() == text, f"{rel} is stale: run `python -m serve_app.cluster render-all`"
    assert gen.main(["render-all", "--root", str(REPO), "--check"]) == 0


def test_check_fails_with_a_diff_when_a_generated_file_was_edited(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for rel in ("configs", "cluster"):
        shutil.copytree(REPO / rel, tmp_path / rel)
    target = tmp_path / "cluster/base/rayservice.yaml"
    target.write_text(target.read_text().replace("maxReplicas: 10", "maxReplicas: 11"))
    assert gen.main(["render-all", "--root", str(tmp_path), "--check"]) == 1
    diff = capsys.readouterr().out
    assert re.search(r"^-\s+maxReplicas: 11$", diff, re.MULTILINE) and re.search(r"^\+\s+maxReplicas: 10$", diff, re.MULTILINE), diff
    # The single-file form used in the README behaves the same.
    out = str(target)
    assert gen.main(["render", str(tmp_path / "configs/production.yaml"), "--template",
                     str(tmp_path / gen.TEMPLATE), "--out", out, "--check"]) == 1
    assert gen.main(["render-all", "--root", str(tmp_path)]) == 0
    assert gen.main(["render-all", "--root", str(tmp_path), "--check"]) == 0


def test_serve_config_v2_is_the_serve_config() -> None:
    rayservice = _docs(REPO / "cluster/base/rayservice.yaml")[0]
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / "configs/production.yaml").read_text())
    patch = _docs(REPO / "cluster/overlays/dev/serve-config-patch.yaml")[0]
    assert yaml.safe_load(patch["spec"]["serveConfigV2"]) == yaml.safe_load((REPO / "configs/dev-k8s.yaml").read_text())


# ----------------------------------------------------------------------------- serve config checks


def _prod() -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs/production.yaml").read_text())


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda c: c["applications"][0]["runtime_env"]["env_vars"].update(OPENAI_API_KEY="sk-abcdefghijklmnopqrstuvwx"), "runtime_env"),
        (lambda c: c["applications"][0]["deployments"][2].update(user_config={"state": "x.json", "token": "abc123"}), "token"),
        (lambda c: c["applications"][0].update(runtime_env={"env_vars": {"NOTE": "Bearer abcdefghijklmnop"}}), "bearer"),
        (lambda c: c["applications"][0]["deployments"][0].update(num_replica=2), "num_replica: not a Serve field"),
        (lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_cpu=1), "num_cpu: not a Serve field"),
        (lambda c: c["applications"][0]["deployments"].append({"name": "qaa"}), "'qaa' is no deployment"),
        (lambda c: c["applications"][0]["args"]["models"][0]["lm"].update(temprature=0.2), "temprature"),
        (lambda c: c["applications"][0]["args"]["cache"]["redis"].update(url="redis://:hunter2@redis:6379/0", url_env=None), "password"),
        (lambda c: c.update(http_optons={"port": 8000}), "http_optons: not a Serve field"),
    ],
)
def test_render_refuses_bad_or_secret_bearing_serve_configs(mutate: Any, complaint: str) -> None:
    config = _prod()
    mutate(config)
    with pytest.raises(gen.ManifestError) as info:
        gen.check_serve_config(config)
    assert complaint.lower() in str(info.value).lower()


def test_secret_finder() -> None:
    assert gen.find_secrets({"lm": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 512}, "redis": {"url_env": "X"}}) == []
    assert gen.find_secrets({"apiKey": "abc"}) and gen.find_secrets({"x": ["redis://u:p@h:1/0"]})
    assert gen.find_secrets({"note": "key sk-proj-0123456789abcdef"}) and gen.find_secrets({"password": "x"})


def test_render_refuses_a_grace_period_not_above_graceful_shutdown(tmp_path: Path) -> None:
    config = _prod()
    config["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"] = 120
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(gen.ManifestError, match="terminationGracePeriodSeconds"):
        gen.render_rayservice(tmp_path / "serve.yaml", REPO / gen.TEMPLATE)


# ----------------------------------------------------------------------------- built objects


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def _built(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects an overlay produces: ``kubectl kustomize`` when available, else the base's
    resource files as they are (patches are then only checked structurally)."""
    cmd = _kustomize_cmd()
    if cmd is None:
        return tuple(_base_objects())
    out = subprocess.run([*cmd, str(REPO / "cluster/overlays" / overlay)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.load_all(out.stdout, Loader=_Loader) if isinstance(d, dict))


def _base_objects() -> Iterator[dict[str, Any]]:
    kustomization = yaml.safe_load((REPO / "cluster/base/kustomization.yaml").read_text())
    for res in kustomization["resources"]:
        path = REPO / "cluster/base" / res
        if path.is_file():
            yield from _docs(path)


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """(label, object) for every built object of every overlay (deduplicated without kustomize)."""
    if _kustomize_cmd() is None:
        return [(f"base:{o['kind']}/{o['metadata']['name']}", o) for o in _built("base")]
    return [(f"{ov}:{o['kind']}/{o['metadata']['name']}", o) for ov in OVERLAYS for o in _built(ov)]


def _of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(label, o) for label, o in _objects() if o["kind"] == kind]


def _rayservices() -> list[tuple[str, dict[str, Any]]]:
    found = _of_kind("RayService")
    assert found, "no RayService built"
    return found


# ----------------------------------------------------------------------------- CRD schemas


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.fail(f"KubeRay CRD missing: {path} (shared/ must sit beside the repository)")
    crd = yaml.load(path.read_text(), Loader=_Loader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _unknown_keys(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of ``obj`` that ``schema`` does not list, where it lists properties and allows no
    others (no additionalProperties, no x-kubernetes-preserve-unknown-fields)."""
    problems: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        open_ended = schema.get("x-kubernetes-preserve-unknown-fields") or extra not in (None, False)
        if props is not None and not open_ended:
            problems += [f"{path}.{k}" for k in obj if k not in props]
        for key, value in obj.items():
            if props and key in props:
                problems += _unknown_keys(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += _unknown_keys(value, extra, f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problems += _unknown_keys(item, schema["items"], f"{path}[{i}]")
    return problems


def _crd_errors(obj: dict[str, Any], kind: str) -> list[str]:
    schema = _crd_schema(kind)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    return errors + [f"{p}: unknown field" for p in _unknown_keys(obj, schema)]


def _as_raycluster(rayservice: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": rayservice["metadata"]["name"]},
            "spec": rayservice["spec"]["rayClusterConfig"]}


def test_rayservice_and_raycluster_validate_against_the_kuberay_crds() -> None:
    for label, rs in _rayservices():
        assert rs["apiVersion"] == "ray.io/v1"
        assert _crd_errors(rs, "RayService") == [], label
        assert _crd_errors(_as_raycluster(rs), "RayCluster") == [], label


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("spec.rayClusterConfig.enableInTreeAutoscalling",
         lambda rs: rs["spec"]["rayClusterConfig"].update(enableInTreeAutoscalling=rs["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling"))),
        ("workerGroupSpecs[0].maxReplica",
         lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplica=3)),
        ("containers[0].readinessProbes",
         lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(readinessProbes={})),
        ("gcsFaultToleranceOptions.redisPasword",
         lambda rs: rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].update(redisPasword={})),
        ("spec.serveConfigV2",
         lambda rs: rs["spec"].update(serveConfigV2={"applications": []})),  # must be a string
        ("minReplicas",
         lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplicas="two")),
    ],
)
def test_a_typo_in_the_rayservice_fails_validation(where: str, mutate: Any) -> None:
    rs = copy.deepcopy(_rayservices()[0][1])
    mutate(rs)
    errors = _crd_errors(rs, "RayService")
    assert errors, f"{where}: the mistake was not caught"


# ----------------------------------------------------------------------------- core objects


def _k8s_validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod_templates(rs: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = rs["spec"]["rayClusterConfig"]
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs") or []:
        yield f"worker:{group['groupName']}", group["template"]


CORE_KINDS = {"ConfigMap", "Service", "StatefulSet", "Secret", "Deployment", "PersistentVolumeClaim"}


def test_core_objects_validate_strictly_against_the_kubernetes_schemas() -> None:
    checked = 0
    for label, obj in _objects():
        if obj["kind"] in CORE_KINDS:
            _k8s_validate(obj)
            checked += 1
    for label, rs in _rayservices():
        for name, template in _pod_templates(rs):
            _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})
            checked += 1
    for doc in _docs(REPO / "cluster/base/secret.example.yaml"):
        _k8s_validate(doc)
    assert checked >= 8


def test_a_typo_in_a_core_object_fails_validation() -> None:
    import kubernetes_validate

    sts = copy.deepcopy(next(o for _, o in _of_kind("StatefulSet")))
    sts["spec"]["serviceNme"] = sts["spec"].pop("serviceName")
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(sts)


def test_monitoring_objects_have_the_operator_shape() -> None:
    """No schema for monitoring.coreos.com ships offline: check the fields we use by hand."""
    monitors = _of_kind("PodMonitor")
    assert {o["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for _, o in monitors} == {"head", "worker"}
    rs = _rayservices()[0][1]["spec"]["rayClusterConfig"]
    port_names = {
        "head": {p["name"] for p in rs["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]},
        "worker": {p["name"] for p in rs["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"]},
    }
    for label, mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon["spec"]) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}, label
        node_type = mon["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        ports = [e["port"] for e in mon["spec"]["podMetricsEndpoints"]]
        assert set(ports) <= port_names[node_type], (label, ports)
        assert set(ports) == ({"metrics", "as-metrics", "dash-metrics"} if node_type == "head" else {"metrics"})
        for endpoint in mon["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
    rules = _of_kind("PrometheusRule")
    assert len({o["metadata"]["name"] for _, o in rules}) == 1
    for label, rule in rules:
        assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
        source = yaml.safe_load((REPO / "cluster/monitoring/alerts.yaml").read_text())
        assert rule["spec"]["groups"] == source["groups"], label
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
    dashboards = [o for _, o in _of_kind("ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    expected = {p.name for p in (REPO / "cluster/monitoring/dashboards").glob("*.json")}
    assert expected and {k for d in dashboards for k in d["data"]} == expected


# ----------------------------------------------------------------------------- kustomize layout


def _kustomization_files(directory: Path) -> list[Path]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    refs = list(k.get("resources") or [])
    refs += [p["path"] for p in k.get("patches") or [] if "path" in p]
    refs += [f for g in k.get("configMapGenerator") or [] for f in g.get("files") or []]
    return [(directory / r).resolve() for r in refs]


def test_kustomizations_reference_files_that_exist_and_parse() -> None:
    """The offline structural check (always runs; the build below needs a kustomize binary)."""
    seen: set[Path] = set()
    todo = [REPO / "cluster/overlays" / o for o in OVERLAYS]
    while todo:
        directory = todo.pop().resolve()
        if directory in seen:
            continue
        seen.add(directory)
        for ref in _kustomization_files(directory):
            assert ref.exists(), f"{directory}/kustomization.yaml references missing {ref}"
            if ref.is_dir():
                todo.append(ref)
            elif ref.suffix == ".json":
                import json

                json.loads(ref.read_text())
            else:
                assert list(yaml.safe_load_all(ref.read_text())), ref
    assert REPO / "cluster/base" in seen and REPO / "cluster/monitoring" in seen
    base = yaml.safe_load((REPO / "cluster/base/kustomization.yaml").read_text())
    assert "secret.example.yaml" not in base["resources"], "the example Secret must never be applied"


@pytest.mark.skipif(_kustomize_cmd() is None, reason="no kubectl or kustomize binary: structural check only")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay: str) -> None:
    objs = _built(overlay)
    namespace = {"dev": "serve-app-dev", "production": "serve-app"}[overlay]
    assert all(o["metadata"].get("namespace") == namespace for o in objs)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("StatefulSet") == 2 and kinds.count("RayService") == 1 and "Secret" not in kinds
    rs = next(o for o in objs if o["kind"] == "RayService")
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / SERVE_CONFIGS[overlay]).read_text())
    images = {c["image"] for _, t in _pod_templates(rs) for c in t["spec"]["containers"]}
    expected = {"dev": "serve-app:dev", "production": "registry.example.com/serve-app:0.1.0"}[overlay]
    assert images == {expected}


# ----------------------------------------------------------------------------- secrets


SECRET_TEXT = re.compile(r"sk-[A-Za-z0-9]|password|passwd|BEGIN [A-Z ]*PRIVATE|AKIA[0-9A-Z]{16}|Bearer ", re.IGNORECASE)


def test_no_secret_in_serve_config_runtime_env_or_user_config() -> None:
    for label, rs in _rayservices():
        text = rs["spec"]["serveConfigV2"]
        assert not SECRET_TEXT.search(text), label
        assert not re.search(r"^\s*api_key\s*:", text, re.MULTILINE), label
        config = yaml.safe_load(text)
        assert gen.find_secrets(config) == [], label
        for app in config["applications"]:
            assert gen.find_secrets(app.get("runtime_env") or {}) == []
            for dep in app.get("deployments") or []:
                assert gen.find_secrets(dep.get("user_config") or {}) == []


def test_secrets_reach_pods_only_through_secret_refs() -> None:
    for label, rs in _rayservices():
        cfg = rs["spec"]["rayClusterConfig"]
        for name, template in _pod_templates(rs):
            for c in template["spec"]["containers"]:
                for env in c.get("env") or []:
                    if gen._secret_key(env["name"]) or env["name"] == "CACHE_REDIS_URL":
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], (label, name, env)
        workers = cfg["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in workers["env"] if "valueFrom" in e}
        assert refs == {"OPENAI_API_KEY": "serve-app-provider-keys", "CACHE_REDIS_URL": "serve-app-cache-redis"}
        head_env = {e["name"] for e in cfg["headGroupSpec"]["template"]["spec"]["containers"][0].get("env") or []}
        assert not head_env & {"OPENAI_API_KEY", "CACHE_REDIS_URL"}, "the head runs no replicas: no provider secrets"
        assert cfg["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "serve-app-gcs-redis"
    for label, sts in _of_kind("StatefulSet"):
        env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        assert all("valueFrom" in e for e in env), label


def test_dockerfile_is_pinned_non_root_and_secret_free() -> None:
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    images = [args.get(f.strip("${}"), f) for f in froms]
    import ray

    assert images and all(re.search(r":\d+\.\d+\.\d+", i) and "latest" not in i for i in images), images
    assert any(f"rayproject/ray:{ray.__version__}-py311" in i for i in images), images
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^ENV .*LITELLM_LOCAL_MODEL_COST_MAP=True", text, re.MULTILINE)
    for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, re.MULTILINE):
        for name in re.findall(r"(\w+)=", line):
            assert not gen._secret_key(name), f"secret-like build variable {name}"
    assert not SECRET_TEXT.search(re.sub(r"^#.*$", "", text, flags=re.MULTILINE))
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "*.env"} <= set(ignored)
    rs = _docs(REPO / "cluster/base/rayservice.yaml")[0]
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


# ----------------------------------------------------------------------------- pods


def _all_pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for label, rs in _rayservices():
        for name, template in _pod_templates(rs):
            yield f"{label}:{name}", template["spec"]
    for label, sts in _of_kind("StatefulSet"):
        yield label, sts["spec"]["template"]["spec"]


def test_every_container_runs_locked_down() -> None:
    for label, pod in _all_pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", label
        assert pod.get("automountServiceAccountToken") is False, label
        mounts_by_volume = {v["name"]: v for v in pod.get("volumes") or []}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (label, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (label, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (label, c["name"])
            assert sc.get("privileged") in (None, False) and sc["runAsNonRoot"] is True
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits", {}).get("memory"), (label, c["name"])
            assert c.get("readinessProbe") and c.get("livenessProbe"), (label, c["name"])
            writable = {m["mountPath"] for m in c.get("volumeMounts") or [] if not m.get("readOnly")}
            assert "/tmp" in writable, f"{label}: {c['name']} needs a writable /tmp (Ray's session dir lives there)"
            for m in c.get("volumeMounts") or []:
                volume = mounts_by_volume.get(m["name"])
                if volume is not None and not m.get("readOnly"):
                    assert "emptyDir" in volume or "persistentVolumeClaim" in volume, (label, m)
    for label, rs in _rayservices():
        auto = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
        assert auto["readOnlyRootFilesystem"] and not auto["allowPrivilegeEscalation"] and auto["capabilities"]["drop"] == ["ALL"]


def test_head_and_worker_group_shape() -> None:
    for label, rs in _rayservices():
        cfg = rs["spec"]["rayClusterConfig"]
        head = cfg["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", label
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert head["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports["dashboard"] == 8265 and ports["metrics"] == 8080 and ports["serve"] == 8000
        assert cfg["enableInTreeAutoscaling"] is True
        for group in cfg["workerGroupSpecs"]:
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
            assert group["maxReplicas"] > group["minReplicas"], f"{label}: nothing to autoscale"
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
        # KubeRay's own admission rules (ray-operator/controllers/ray/utils/validation.go).
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rs["metadata"]["name"])
        assert rs["spec"]["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
        assert "redis-password" not in head["rayStartParams"]
        head_env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env") or []}
        assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}
        assert "ray.io/ft-enabled" not in (rs["metadata"].get("annotations") or {})
        if cfg.get("authOptions", {}).get("mode") == "token":
            assert tuple(map(int, cfg["rayVersion"].split("."))) >= (2, 52, 0)


def test_gcs_fault_tolerance_uses_its_own_redis() -> None:
    for label, rs in _rayservices():
        ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
        host = ft["redisAddress"].split("://")[-1].split(":")[0]
        assert host == "serve-app-gcs-redis", label
    confs = {o["metadata"]["name"]: o["data"]["redis.conf"] for _, o in _of_kind("ConfigMap") if "redis.conf" in o.get("data", {})}
    assert re.search(r"^maxmemory \d+", confs["serve-app-redis-config"], re.MULTILINE)
    assert re.search(r"^maxmemory-policy allkeys-lru$", confs["serve-app-redis-config"], re.MULTILINE)
    assert re.search(r"^maxmemory-policy noeviction$", confs["serve-app-gcs-redis-config"], re.MULTILINE)
    for label, sts in _of_kind("StatefulSet"):
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data", label
        secret = sts["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"]
        expected = "serve-app-gcs-redis" if "gcs" in sts["metadata"]["name"] else "serve-app-cache-redis"
        assert secret == expected, label


# ----------------------------------------------------------------------------- timeouts (S6)


def test_grace_period_exceeds_every_graceful_shutdown_timeout() -> None:
    for label, rs in _rayservices():
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        longest = max(gen.graceful_timeouts(config).values())
        for name, template in _pod_templates(rs):
            assert template["spec"]["terminationGracePeriodSeconds"] > longest, (label, name)


@pytest.mark.parametrize("path", sorted(set(SERVE_CONFIGS.values())))
def test_timeout_ladder(path: str) -> None:
    """lm.timeout_s < model timeout_s < limits.request_timeout_s < http_options.request_timeout_s
    < every graceful_shutdown_timeout_s < the pods' terminationGracePeriodSeconds."""
    from serve_app.config import AppArgs

    config = yaml.safe_load((REPO / path).read_text())
    proxy = config["http_options"]["request_timeout_s"]
    grace = _docs(REPO / gen.TEMPLATE)[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for app in config["applications"]:
        graceful = [float(d.get("graceful_shutdown_timeout_s", gen.SERVE_DEFAULT_GRACEFUL_S)) for d in app.get("deployments") or []]
        if app["import_path"] != gen.BUILD_APP:
            continue
        args = AppArgs.model_validate(app["args"])
        for m in args.models:
            assert m.lm.timeout_s < m.timeout_s < args.limits.request_timeout_s < proxy, m.name
        named = {d["name"] for d in app["deployments"]}
        deployments = {v.deployment for m in args.models for v in m.served_variants()}
        assert named >= {"Router", "Cache"} | deployments, "every deployment sets its own options"
        assert proxy < min(graceful) and max(graceful) < grace
        for d in app["deployments"]:
            assert d["ray_actor_options"]["num_cpus"] > 0, f"{path}: {d['name']} must request CPU to spread to workers"
            if d["name"] in named - {"Router", "Cache"}:
                assert "max_ongoing_requests" in d and "max_queued_requests" in d, d["name"]
