"""deploy/, the Dockerfile and the compose stack, checked offline and run for real.

- Kubernetes: the kustomize overlays are rendered (by a small renderer here that applies what the overlays use:
  resources, namespace, images, replicas, strategic-merge patches; compared with `kubectl kustomize` where kubectl
  is installed) and every built-in object is validated against the Kubernetes JSON schemas (kubernetes-validate,
  strict: unknown fields fail). The Prometheus Operator's objects, which those schemas lack, are checked field by
  field, the PrometheusRule against deploy/prometheus/alerts.yml. The wiring is checked: selectors, ports, probes,
  the Secret and ConfigMap references, and the worker's command line, parsed by the CLI's own parser.
- Dockerfile and compose: referenced files exist, ports agree with what the processes serve and what Prometheus
  scrapes, commands parse with the real parsers.
- Real processes: the image's ENTRYPOINT+CMD, the dev overlay's container command (with the dev Secret's password
  on a Redis that requires it) and the example app, each started as the container would start it; the workers
  must answer /healthz, /readyz and /metrics, then exit 0 on SIGTERM within the pod's grace period.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import kubernetes_validate
import pytest
import redis
import yaml

from dynamiq_redis_ckpt.cli import build_parser
from tests.redis_proc import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "production")
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
WORKER_JOB = "dynamiq-redis-ckpt-worker"  # the job DynamiqCkptWorkerDown selects
DRAIN_SECONDS = 30  # SIGTERM: the worker waits up to this long for the runs it handed back
# The oldest Kubernetes we support and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}


# ---- a small kustomize ------------------------------------------------------------------------------------------


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base, patch):
    """Strategic merge as the overlays use it: maps merge, lists of named maps merge by name, others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            names = [existing["name"] for existing in out]
            if item["name"] in names:
                index = names.index(item["name"])
                out[index] = _merge(out[index], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _pod_spec(obj: dict) -> dict | None:
    return obj.get("spec", {}).get("template", {}).get("spec") if obj["kind"] in {"Deployment", "StatefulSet"} else None


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` makes, for the features these kustomizations use (anything else fails)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "namespace", "resources", "images", "replicas", "patches"}
    assert not unknown, f"{folder}: the test's renderer does not know {unknown}"
    objects: list[dict] = []
    for resource in spec.get("resources", []):
        path = folder / resource
        objects += render(path) if path.is_dir() else _load_docs(path)
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, "only strategic-merge patch files"
        for doc in _load_docs(folder / patch["path"]):
            key = (doc["kind"], doc["metadata"]["name"])
            targets = [o for o in objects if (o["kind"], o["metadata"]["name"]) == key]
            assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} objects"
            objects[objects.index(targets[0])] = _merge(targets[0], doc)
    for change in spec.get("replicas", []):
        matched = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == change["name"]]
        assert matched, f"replicas: no Deployment {change['name']}"
        for obj in matched:
            obj["spec"]["replicas"] = change["count"]
    for image in spec.get("images", []):
        for obj in objects:
            for container in (_pod_spec(obj) or {}).get("containers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def worker_of(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "dynamiq-redis-ckpt-worker")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a literal $, anything else stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group() == "$$" else env.get(m.group(1), m.group()), text)  # fmt: skip


def container_env(objects: list[dict], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The worker container's environment as the kubelet makes it: envFrom ConfigMaps, then env in order."""
    pod = _pod_spec(worker_of(objects))
    container = pod["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def dev_secrets(objects: list[dict]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("stringData", {}) for o in objects if o["kind"] == "Secret"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {"base": render(KUSTOMIZE / "base")} | {name: render(KUSTOMIZE / "overlays" / name) for name in OVERLAYS}


# ---- Kubernetes manifests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(overlay, rendered):
    """Where kubectl is installed, its kustomize must build exactly what the renderer above builds."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are checked with the renderer alone")
    built = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
                           capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(built), key=key) == sorted(rendered[overlay], key=key)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_every_builtin_object_is_valid_against_the_kubernetes_schemas(overlay, version, rendered):
    checked = set()
    for obj in rendered[overlay]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any error
        checked.add(obj["kind"])
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"} <= checked


def test_the_schema_validation_rejects_a_broken_deployment(rendered):
    """The validation above can fail: a misspelt field and a wrong type are both refused."""
    misspelt = copy.deepcopy(worker_of(rendered["base"]))
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    wrong_type = copy.deepcopy(worker_of(rendered["base"]))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_the_prometheus_operator_objects_are_well_formed_and_select_the_worker(overlay, rendered):
    objects = rendered[overlay]
    service, monitor = one(objects, "Service", "dynamiq-redis-ckpt-worker"), one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert set(monitor["spec"]) <= {"jobLabel", "selector", "endpoints", "namespaceSelector", "podTargetLabels"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor selects the Service"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == WORKER_JOB, "job label = the alerts' job"
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
        assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
    if overlay != "base":
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == rule["metadata"]["namespace"]


def test_the_prometheusrule_file_is_generated_from_alerts_yml(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", DEPLOY / "gen_prometheusrule.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (KUSTOMIZE / "base" / "prometheusrule.yaml").read_text() == gen.render(), "run deploy/gen_prometheusrule.py"
    assert gen.main(["--check"]) == 0
    changed = (DEPLOY / "prometheus" / "alerts.yml").read_text().replace("> 30", "> 31", 1)
    assert gen.render(changed) != gen.render(), "the generated file follows alerts.yml"


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_the_worker_deployment_is_wired_as_documented(overlay, rendered):
    objects = rendered[overlay]
    deployment, service = worker_of(objects), one(objects, "Service", "dynamiq-redis-ckpt-worker")
    pdb = one(objects, "PodDisruptionBudget")
    pod = _pod_spec(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2 and 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pod["terminationGracePeriodSeconds"] > DRAIN_SECONDS
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root"
    tls = volumes[mounts["/etc/dynamiq-redis-ckpt/tls"]]["secret"]
    assert tls["optional"] is True and tls["secretName"] == "dynamiq-redis-ckpt-tls"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # probes: on the named metrics port, the paths the worker serves
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "room to import Dynamiq and warm up"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"metrics"} and "metrics" in ports
    assert service["spec"]["publishNotReadyAddresses"] is True, "a worker that is not ready is still scraped"
    # the password comes from a Secret, never from the ConfigMap
    env = {v["name"]: v for v in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "dynamiq-redis-ckpt-redis", "key": "password"}
    assert "$(REDIS_PASSWORD)" in env["DYNAMIQ_REDIS_CKPT_URL"]["value"]
    config = one(objects, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    assert not any("password" in key.lower() for key in config)
    # every $(VAR) the command, args and env use is defined before its use
    defined = set(config)
    for var in container["env"]:
        for used in re.findall(r"\$\(([A-Za-z_0-9]+)\)", var.get("value", "")):
            assert used in defined, f"{var['name']} uses $({used}) before it is defined"
        defined.add(var["name"])
    for arg in container["command"] + container["args"]:
        for used in re.findall(r"\$\(([A-Za-z_0-9]+)\)", arg):
            assert used in defined, f"{arg} uses an undefined variable"


@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_the_worker_command_line_parses_with_the_cli_and_serves_on_the_probed_port(overlay, rendered):
    objects = rendered[overlay]
    container = _pod_spec(worker_of(objects))["containers"][0]
    env = container_env(objects, {"dynamiq-redis-ckpt-redis": {"password": "s3cret"}})
    command = [expand(part, env) for part in container["command"] + container["args"]]
    assert command[0] == "dynamiq-redis-ckpt" == next(iter(_console_scripts())), "the package's console script"
    args = build_parser().parse_args(command[1:])
    config = one(objects, "ConfigMap")["data"]
    assert args.command == "worker" and args.flows == config["FLOWS"]
    assert args.prefix == config["DYNAMIQ_REDIS_CKPT_PREFIX"]
    assert (args.concurrency, args.lease_ttl, args.max_attempts) == (
        int(config["CONCURRENCY"]), float(config["LEASE_TTL"]), int(config["MAX_ATTEMPTS"]))  # fmt: skip
    assert (args.poll, args.stall_seconds) == (float(config["POLL"]), float(config["STALL_SECONDS"]))
    assert args.metrics_port == {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    pool = redis.ConnectionPool.from_url(env["DYNAMIQ_REDIS_CKPT_URL"])
    assert pool.connection_kwargs["password"] == "s3cret"
    address = (pool.connection_kwargs["host"], pool.connection_kwargs["port"])
    assert address == (config["REDIS_HOST"], int(config["REDIS_PORT"]))
    if config["REDIS_SCHEME"] == "rediss":
        mount = "/etc/dynamiq-redis-ckpt/tls"
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"].startswith(mount + "/")


def test_the_overlays_differ_from_the_base_as_intended(rendered):
    dev, prod = rendered["dev"], rendered["production"]
    redis_dev = one(dev, "Deployment", "redis")
    secret = one(dev, "Secret", "dynamiq-redis-ckpt-redis")
    assert "$(REDIS_PASSWORD)" in redis_dev["spec"]["template"]["spec"]["containers"][0]["args"]
    assert one(dev, "Service", "redis")["spec"]["ports"][0]["port"] == int(one(dev, "ConfigMap")["data"]["REDIS_PORT"])
    assert secret["stringData"]["password"] and worker_of(dev)["spec"]["replicas"] == 2
    assert not [o for o in prod if o["kind"] == "Secret"], "production Secrets are created outside git"
    assert worker_of(prod)["spec"]["replicas"] == 3 and one(prod, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert _pod_spec(worker_of(prod))["containers"][0]["image"] == "registry.example.com/acme/checkout-worker:1.0.0"
    assert _pod_spec(worker_of(dev))["containers"][0]["image"] == "dynamiq-redis-ckpt-worker:dev"
    assert {o["metadata"].get("namespace") for o in prod} == {"dynamiq"}
    base_keys = set(one(rendered["base"], "ConfigMap")["data"])
    for overlay in OVERLAYS:
        assert set(one(rendered[overlay], "ConfigMap")["data"]) == base_keys, f"{overlay}: a setting nobody reads"


# ---- Dockerfile -------------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip


def instruction(name: str) -> list[str]:
    return [args for op, args in dockerfile() if op == name]


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def image_command() -> list[str]:
    [entrypoint], [cmd] = instruction("ENTRYPOINT"), instruction("CMD")
    return json.loads(entrypoint) + json.loads(cmd)


def image_copies() -> dict[str, str]:
    """Repository path -> path in the image, for every COPY."""
    workdir = instruction("WORKDIR")[-1]
    copies = {}
    for args in instruction("COPY"):
        *sources, dest = shlex.split(args)
        for source in sources:
            target = dest if not dest.endswith("/") else dest + Path(source).name
            copies[source] = target if target.startswith("/") else f"{workdir}/{target}"
    return copies


def test_the_dockerfile_copies_files_that_exist_and_the_build_context_keeps():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*", "the context holds only what is un-ignored below"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = image_copies()
    assert copies, "the Dockerfile copies the package"
    for source in copies:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert source.rstrip("/") in kept, f"COPY {source}: excluded from the build context by .dockerignore"
    assert {"pyproject.toml", "README.md", "dynamiq_redis_ckpt"} <= set(copies), "what `pip install` needs"


def test_the_dockerfile_runs_the_worker_as_non_root_on_its_exposed_port():
    [base] = instruction("FROM")
    assert base == "python:3.11-slim"
    [user] = instruction("USER")
    assert user.split(":")[0] == "10001"
    command = image_command()
    assert command[0] in _console_scripts() and _console_scripts()[command[0]] == "dynamiq_redis_ckpt.cli:main"
    args = build_parser().parse_args(command[1:])
    assert args.command == "worker" and args.metrics_port is not None
    assert instruction("EXPOSE") == [str(args.metrics_port)]
    [healthcheck] = instruction("HEALTHCHECK")
    assert f"127.0.0.1:{args.metrics_port}/healthz" in healthcheck
    module = args.flows.split(":")[0]
    env = " ".join(instruction("ENV"))
    pythonpath = re.search(r"PYTHONPATH=(\S+)", env).group(1)
    assert f"{pythonpath}/{module}.py" in image_copies().values(), "the default --flows module is in the image"


# ---- docker compose ---------------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def container_port(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def example_app_parser():
    sys.path.insert(0, str(COMPOSE_DIR))
    try:
        import example_app
    finally:
        sys.path.remove(str(COMPOSE_DIR))
    return example_app


def test_compose_files_builds_and_mounts_exist():
    services = compose()["services"]
    assert {"redis", "worker", "app", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            context = COMPOSE_DIR / service["build"]["context"]
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
        for needed in service.get("depends_on", []):
            assert needed in services, f"{name} depends on unknown {needed}"


def test_compose_commands_parse_and_ports_match_what_prometheus_scrapes():
    services = compose()["services"]
    worker = services["worker"]
    # the service's command replaces the image's CMD, after its ENTRYPOINT
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    args = build_parser().parse_args(entrypoint[1:] + worker["command"])
    assert args.command == "worker" and container_port(worker) == {args.metrics_port}
    assert worker["environment"]["DYNAMIQ_REDIS_CKPT_URL"].startswith("redis://redis:6379/")
    assert args.prefix == worker["environment"]["DYNAMIQ_REDIS_CKPT_PREFIX"], "the worker watches the app's namespace"
    assert int(re.search(r"(\d+)s$", worker["stop_grace_period"]).group(1)) > DRAIN_SECONDS

    app = services["app"]
    script = app["entrypoint"][-1]
    assert script in image_copies().values(), "the app's script is in the image"
    app_args = example_app_parser().build_parser().parse_args(app["command"])
    assert container_port(app) == {app_args.port} and app["environment"] == worker["environment"]

    mounts = dict(v.split(":")[1::-1] for v in services["prometheus"]["volumes"])  # target -> source
    config = yaml.safe_load((COMPOSE_DIR / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert (COMPOSE_DIR / mounts["/etc/prometheus/alerts.yml"]).resolve() == DEPLOY / "prometheus" / "alerts.yml"
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets[WORKER_JOB] == [f"worker:{args.metrics_port}"]
    assert [f"app:{app_args.port}"] in targets.values()


def test_compose_prometheus_config_passes_promtool(tmp_path):
    """promtool check config, with the rule file where the container mounts it rewritten to the repository's."""
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "promtool is missing: apt-get install prometheus (.ci/run does)"
    run = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_grafana_provisions_prometheus_and_the_dashboards_directory():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[1::-1] for v in grafana["volumes"])
    provisioning = COMPOSE_DIR / mounts["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090" and 9090 in container_port(compose()["services"]["prometheus"])
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dynamiq-redis-ckpt.yml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (COMPOSE_DIR / dashboards).resolve() == ROOT / "dashboards"
    for board in (ROOT / "dashboards").glob("*.json"):  # Grafana must be able to load each one
        assert isinstance(json.loads(board.read_text()).get("panels"), list), board.name


# ---- the commands, run as the containers run them ---------------------------------------------------------------


def _status(port: int, path: str) -> int | None:
    try:
        return urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except HTTPError as e:
        return e.code
    except (URLError, ConnectionError, TimeoutError):
        return None


def _python_command(command: list[str]) -> list[str]:
    """The container's command as a process here: the console script is `python -m` its module, a script in the
    image's /app is the repository file the Dockerfile copies there."""
    copied = {target: source for source, target in image_copies().items()}
    if command[0] in _console_scripts():
        return [sys.executable, "-m", _console_scripts()[command[0]].split(":")[0]] + command[1:]
    if command[0] == "python":
        return [sys.executable, str(ROOT / copied[command[1]])] + command[2:]
    raise AssertionError(f"unknown command {command}")


def _with_port(command: list[str], flag: str, port: int) -> list[str]:
    """``command`` with ``flag``'s value (``--flag N`` or ``--flag=N``) set to a free port of this machine."""
    out, replaced = [], False
    for i, part in enumerate(command):
        if part.startswith(flag + "="):
            out.append(f"{flag}={port}")
            replaced = True
        elif i and command[i - 1] == flag:
            out.append(str(port))
            replaced = True
        else:
            out.append(part)
    assert replaced, f"{flag} not in {command}"
    return out


class Started:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.port, self.log, self.env = name, port, log, env
        image_path = str(ROOT) + os.pathsep + str(COMPOSE_DIR)  # the package and the image's /app
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=os.environ | env | {"PYTHONPATH": image_path},
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)  # fmt: skip
        self.started = time.monotonic()

    def wait_until(self, predicate, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll()
            assert exited is None, f"{self.name} exited {exited}:\n{self.log.read_text()[-3000:]}"
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: timed out\n{self.log.read_text()[-3000:]}")

    def stop(self) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - started


@pytest.fixture(scope="module")
def running(tmp_path_factory, rendered):
    """The image's worker, the dev overlay's worker and the example app, started together (each imports Dynamiq,
    which takes seconds: in parallel the three cost about what one does)."""
    folder = tmp_path_factory.mktemp("deploy-run")
    plain, guarded = RedisProcess().start(), RedisProcess().start()
    secrets = dev_secrets(rendered["dev"])
    password = secrets["dynamiq-redis-ckpt-redis"]["password"]
    redis.Redis(port=guarded.port).config_set("requirepass", password)  # as the dev overlay's Redis does
    started = {}
    try:
        # 1. the image: ENTRYPOINT + CMD, the url from the environment as compose and Kubernetes give it
        port = free_port()
        argv = _python_command(_with_port(image_command(), "--metrics-port", port))
        started["image"] = Started("image", argv, {"DYNAMIQ_REDIS_CKPT_URL": plain.url}, port, folder / "image.log")
        # 2. the dev overlay's container: its env (ConfigMap, Secret, $(VAR)s) and its command; only the address of
        #    Redis is this machine's instead of the Service's
        objects = copy.deepcopy(rendered["dev"])
        one(objects, "ConfigMap")["data"].update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(guarded.port))
        env = container_env(objects, secrets)
        container = _pod_spec(worker_of(objects))["containers"][0]
        port = free_port()
        argv = _python_command(_with_port([expand(p, env) for p in container["command"] + container["args"]],
                                          "--metrics-port", port))  # fmt: skip
        started["kubernetes"] = Started("kubernetes", argv, env, port, folder / "kubernetes.log")
        # 3. the compose app: its entrypoint and command, beside the dev overlay's worker (same Redis and prefix).
        #    Its second run dies mid-run (as every tenth does in compose) with a 3 s lease: that worker finishes it.
        app = compose()["services"]["app"]
        port = free_port()
        argv = _python_command(_with_port(app["entrypoint"] + app["command"], "--port", port))
        argv += ["--runs", "2", "--pause", "5", "--crash-every", "2"]
        shared = ("DYNAMIQ_REDIS_CKPT_URL", "DYNAMIQ_REDIS_CKPT_PREFIX")
        app_env = app["environment"] | {key: env[key] for key in shared}
        app_env |= {"EXAMPLE_STEP_SECONDS": "0.02", "LEASE_TTL": "3"}
        started["app"] = Started("app", argv, app_env, port, folder / "app.log")
        yield started | {"plain": plain, "guarded": guarded, "password": password}
    finally:
        for one_started in started.values():
            if one_started.proc.poll() is None:
                one_started.proc.kill()
                one_started.proc.wait()
        plain.kill()
        guarded.kill()


def test_the_example_app_runs_checkpointed_flows_and_the_dev_worker_recovers_its_crashed_run(running):
    """Before the workers' tests stop them: the app's first run completes and its /metrics answers; its second
    run dies in the middle (exit 3), and the dev overlay's worker, whose --flows is the image's example module,
    claims the orphan and completes it."""
    from dynamiq.checkpoints.types import CheckpointStatus

    from dynamiq_redis_ckpt import RedisCheckpointBackend

    app = running["app"]
    app.wait_until(lambda: re.search(r"run \S+-1: success", app.log.read_text()))
    assert _status(app.port, "/metrics") == 200, "the app serves /metrics while it runs"
    scraped = urlopen(f"http://127.0.0.1:{app.port}/metrics", timeout=5).read().decode()
    assert "dynamiq_ckpt_saves_total{outcome=\"ok\"}" in scraped and "python_info" in scraped
    assert app.proc.wait(timeout=90) == 3, f"the second run did not die mid-run:\n{app.log.read_text()[-2000:]}"
    backend = RedisCheckpointBackend(url=app.env["DYNAMIQ_REDIS_CKPT_URL"], prefix=app.env["DYNAMIQ_REDIS_CKPT_PREFIX"])
    crashed = re.search(r"run (\S+-2) will crash", app.log.read_text()).group(1)

    def completed():
        latest = backend.get_latest_by_flow("orders")
        return latest is not None and latest.wf_run_id == crashed and latest.status == CheckpointStatus.COMPLETED

    deadline = time.monotonic() + 90
    while not completed():
        assert time.monotonic() < deadline, f"not recovered:\n{running['kubernetes'].log.read_text()[-3000:]}"
        assert running["kubernetes"].proc.poll() is None, "the dev worker exited"
        time.sleep(0.3)


@pytest.mark.parametrize("which", ["image", "kubernetes"])
def test_the_container_command_serves_health_and_metrics_then_stops_on_sigterm(which, running, rendered):
    worker = running[which]
    worker.wait_until(lambda: "worker ready" in worker.log.read_text())
    print(f"\n[{which}] ready {time.monotonic() - worker.started:.1f} s after start")
    assert _status(worker.port, "/healthz") == 200 and _status(worker.port, "/readyz") == 200
    metrics = urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5).read().decode()
    assert "dynamiq_ckpt_runs_in_progress" in metrics
    if which == "kubernetes":  # it reached the Redis that wants the password (no password: NOAUTH)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=running["guarded"].port).ping()
        assert redis.Redis(port=running["guarded"].port, password=running["password"]).ping()
    grace = _pod_spec(worker_of(rendered["dev"]))["terminationGracePeriodSeconds"]
    code, took = worker.stop()
    print(f"[{which}] exited {code} {took:.1f} s after SIGTERM")
    assert code == 0, worker.log.read_text()[-3000:]
    assert took < grace, f"SIGTERM took {took:.1f} s, longer than the pod's grace period"
