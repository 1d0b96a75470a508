"""deploy/: the Dockerfile, the compose stack and the Kubernetes manifests.

Docker and kubectl do not run here, so each artefact is checked against what it names: files
in the repo, the real CLI parsers and config loader, the catalog, the apps' routes, and the
Kubernetes OpenAPI schemas (kubernetes-validate, strict).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from starlette.routing import Match

from backends.emulator.catalog import Catalog
from backends.server.app import create_backend_app
from backends.server.cli import config_from_args
from gateway.app import create_app
from gateway.cli import COMMANDS
from gateway.policies import POLICIES
from gateway.settings import HttpWorker, Settings, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
PDGATE_IMAGE = "pdgate"


# -- helpers -----------------------------------------------------------------------------------


@cache
def catalog() -> Catalog:
    return Catalog.load()


def gateway_config(path: Path | None = None) -> Settings:
    """A gateway config file, loaded as ``pdgate serve`` loads it."""
    return load_settings(path, catalog=catalog(), policies=set(POLICIES))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit; a test wants the reason
        raise ValueError(f"{self.prog}: {message}")


def parse_command(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """``argv`` (without ``pdgate``) through the real subcommand parser."""
    name, *rest = argv
    assert name in COMMANDS, f"unknown pdgate command {name!r}"
    parser = _Parser(prog=f"pdgate {name}")
    importlib.import_module(COMMANDS[name][0]).configure(parser)
    return name, parser.parse_args(rest)


def check_backend_args(args: argparse.Namespace) -> None:
    """What ``pdgate backend`` checks before it starts: the deployment fits, the link exists."""
    config = config_from_args(args)
    catalog().deployment(
        config.device, config.model, dtype=config.dtype, count=config.count, tp=config.tp,
        engine=config.engine,
    )  # fmt: skip
    catalog().link(config.kv_link)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, rest = (pending + line).partition(" ")
        out.append((instruction.upper(), rest.strip()))
        pending = ""
    return out


def docker(instruction: str) -> list[str]:
    return [rest for ins, rest in dockerfile() if ins == instruction]


def dockerignored() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


class Routes:
    """Answers ``path in routes``: does a GET of ``path`` reach one of the app's routes?"""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __contains__(self, path: object) -> bool:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
        return any(r.matches(scope)[0] == Match.FULL for r in self.app.routes)


@cache
def gateway_routes() -> Routes:
    return Routes(create_app(gateway_config(), catalog=catalog()))


@cache
def backend_routes() -> Routes:
    args = parse_command(["backend", "--device", "h100-sxm", "--model", "llama-3.1-8b"])[1]
    return Routes(create_backend_app(config_from_args(args), catalog()))


def test_route_lookup_tells_routes_apart() -> None:
    gateway, backend = gateway_routes(), backend_routes()
    assert "/ready" in gateway
    assert "/ready" not in backend
    assert "/readiness" in backend
    assert "/health" in gateway
    assert "/healthz" not in gateway


def http_workers(settings: Settings) -> Iterator[tuple[str, HttpWorker]]:
    for m in settings.models:
        for role, pool in m.pools.items():
            for w in pool.workers:
                assert isinstance(w, HttpWorker), f"{m.name}.{role}: expected http workers"
                yield role, w


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in an argument list."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    copies = docker("COPY")
    assert copies, "the Dockerfile copies nothing"
    ignored = dockerignored()
    for rest in copies:
        assert not rest.startswith("--from"), rest
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repo"
            top = PurePosixPath(src).parts[0]
            assert top not in ignored, f"COPY {src}: excluded by .dockerignore"


def test_image_installs_every_package() -> None:
    """The image installs the project as a wheel, so a package missing from pyproject's list
    would be absent there even though the editable install finds it."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("gateway", "backends")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    copied = {PurePosixPath(r.split()[0]).parts[0] for r in docker("COPY")}
    assert {"gateway", "backends", "config", "pyproject.toml"} <= copied


def test_entrypoint_is_the_console_script_and_cmd_runs_the_gateway() -> None:
    scripts = pyproject()["project"]["scripts"]
    (entrypoint,) = docker("ENTRYPOINT")
    assert json.loads(entrypoint) == ["pdgate"]
    assert scripts["pdgate"] == "gateway.cli:main"
    (cmd,) = docker("CMD")
    name, args = parse_command(json.loads(cmd))
    assert name == "serve"
    assert args.host == "0.0.0.0"
    (expose,) = docker("EXPOSE")
    assert int(expose) == gateway_config().server.port


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in docker("ENV"):
        for item in rest.split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_image_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    (user,) = docker("USER")
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    (check,) = docker("HEALTHCHECK")
    exec_form = json.loads(check[check.index("CMD") + 3 :])
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")
    assert "PDGATE_HEALTH_URL" in exec_form[2]
    url = urlsplit(dockerfile_env()["PDGATE_HEALTH_URL"])
    assert url.path in gateway_routes()
    assert url.port == gateway_config().server.port


# -- compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def pdgate_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return {n: s for n, s in services.items() if "build" in s}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to deploy/)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        assert source.startswith("."), f"{volume}: only bind mounts of repo files"
        out[target] = (DEPLOY / source).resolve()
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    path = PurePosixPath(container_path)
    for target, source in sorted(mounts(service).items(), key=lambda t: -len(t[0])):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted into the service")


def listen_port(service: dict[str, Any]) -> int:
    """The port a pdgate service listens on, from its command and (gateway) its config."""
    name, args = parse_command(service["command"])
    if name == "backend":
        return int(args.port)
    return args.port or gateway_config(host_path(service, str(args.config))).server.port


def test_compose_names_only_images_and_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "prometheus", "grafana"} <= set(services)
    ours = pdgate_services(compose)
    for name, service in services.items():
        image = service["image"]
        if name in ours:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: builds from {context}"
            assert (context / service["build"]["dockerfile"]).is_file()
            assert image.split(":")[0] == PDGATE_IMAGE
        else:
            repo, _, tag = image.rpartition(":")
            assert repo, f"{name}: image {image} has no tag"
            assert tag != "latest", f"{name}: pin {image}"
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: mounts {source} (absent) at {target}"
            assert ROOT in source.parents, f"{name}: mounts {source} from outside the repo"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), f"{name}: depends on an unknown service"


def test_compose_runs_two_gateway_replicas_sharing_redis(compose: dict[str, Any]) -> None:
    ours = pdgate_services(compose)
    gateways = {n: s for n, s in ours.items() if s["command"][0] == "serve"}
    assert len(gateways) == 2
    hostnames = {s["hostname"] for s in gateways.values()}
    assert len(hostnames) == 2, "replica ids default to hostname-pid: give each its own"
    published = [p.rsplit(":", 2)[-2] for s in gateways.values() for p in s["ports"]]
    assert len(set(published)) == 2
    for name, service in gateways.items():
        _, args = parse_command(service["command"])
        settings = gateway_config(host_path(service, str(args.config)))
        assert settings.state.backend == "redis"
        redis_url = urlsplit(settings.state.redis_url)
        assert redis_url.hostname in compose["services"], f"{name}: {redis_url.hostname}"
        assert redis_url.port == 6379
        for container_port in (p.rsplit(":", 1)[-1] for p in service["ports"]):
            assert int(container_port) == listen_port(service)
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_gateway_workers_are_the_backend_services(compose: dict[str, Any]) -> None:
    """Every worker URL names a backend service on the port it listens on, in the pool's role;
    each backend advertises its service name, so a decode instance can pull KV from it."""
    ours = pdgate_services(compose)
    backends: dict[str, argparse.Namespace] = {}
    for name, service in ours.items():
        command, args = parse_command(service["command"])
        if command == "backend":
            check_backend_args(args)
            assert args.host == "0.0.0.0"
            assert args.advertise_host == name
            backends[name] = args
    assert {a.role for a in backends.values()} == {"prefill", "decode"}
    gateway = next(s for s in ours.values() if s["command"][0] == "serve")
    _, args = parse_command(gateway["command"])
    settings = gateway_config(host_path(gateway, str(args.config)))
    used = set()
    for role, worker in http_workers(settings):
        url = urlsplit(worker.url)
        assert url.hostname in backends, f"{worker.url}: no such backend service"
        assert url.port == backends[url.hostname].port
        assert backends[url.hostname].role in (role, "both")
        used.add(url.hostname)
    assert used == set(backends)


def test_compose_healthchecks_probe_the_port_each_service_listens_on(
    compose: dict[str, Any],
) -> None:
    default = dockerfile_env()["PDGATE_HEALTH_URL"]
    backend_paths, gateway_paths = backend_routes(), gateway_routes()
    for name, service in pdgate_services(compose).items():
        url = urlsplit(service.get("environment", {}).get("PDGATE_HEALTH_URL", default))
        assert url.port == listen_port(service), name
        command = service["command"][0]
        assert url.path in (backend_paths if command == "backend" else gateway_paths), name


def test_compose_prometheus_scrapes_every_pdgate_service(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_path = "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(host_path(prometheus, config_path).read_text())
    for rule in config["rule_files"]:
        rules = host_path(prometheus, str(PurePosixPath(config_path).parent / rule))
        assert rules.is_file(), rule
        assert yaml.safe_load(rules.read_text())["groups"]
    ours = pdgate_services(compose)
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"{name}:{listen_port(s)}" for name, s in ours.items()}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert jobs == {job["job_name"] for job in shipped["scrape_configs"]}


def test_compose_prometheus_config_passes_promtool_as_mounted(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The config and the rules laid out as the container sees them under /etc/prometheus."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (scripts/test installs prometheus)"
    prometheus = compose["services"]["prometheus"]
    for target, source in mounts(prometheus).items():
        relative = PurePosixPath(target).relative_to("/etc/prometheus")
        copy_tree = shutil.copytree if source.is_dir() else shutil.copy
        copy_tree(source, tmp_path / relative)
    config = tmp_path / "prometheus.yml"
    done = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_compose_grafana_is_provisioned_from_deploy(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = "/etc/grafana/provisioning"
    (datasource_file,) = [
        source for target, source in mounts(grafana).items()
        if PurePosixPath(target).parent == PurePosixPath(f"{provisioning}/datasources")
    ]  # fmt: skip
    (datasource,) = yaml.safe_load(datasource_file.read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"]
    assert url.port == 9090
    shipped = DEPLOY / "grafana" / "provisioning" / "datasources" / "pdgate.yml"
    (original,) = yaml.safe_load(shipped.read_text())["datasources"]
    assert datasource["uid"] == original["uid"]
    providers = 0
    for provider_file in host_path(grafana, f"{provisioning}/dashboards").glob("*.yml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            dashboards = list(host_path(grafana, provider["options"]["path"]).glob("*.json"))
            assert dashboards, provider["options"]["path"]
            for d in dashboards:
                assert json.loads(d.read_text())["panels"]
            providers += 1
    assert providers


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


@pytest.fixture(scope="module")
def manifests(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def k8s_settings(kustomization: dict[str, Any]) -> Settings:
    (generator,) = kustomization["configMapGenerator"]
    (config_file,) = generator["files"]
    data = yaml.safe_load((K8S / config_file).read_text())
    return parse_settings(data, catalog=catalog(), policies=set(POLICIES), source=config_file)


def test_kustomization_lists_exactly_the_files_present(kustomization: dict[str, Any]) -> None:
    present = {str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file()}
    resources = set(kustomization["resources"])
    generated = {f.split("=")[-1] for g in kustomization["configMapGenerator"] for f in g["files"]}
    assert len(resources) == len(kustomization["resources"]), "a resource is listed twice"
    assert resources | generated | {"kustomization.yaml"} == present
    assert not resources & generated


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    manifests: list[dict[str, Any]], version: str
) -> None:
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"} <= {
        m["kind"] for m in manifests
    }


def test_schema_validation_is_strict(manifests: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(of_kind(manifests, "Deployment")["pdgate-gateway"])
    containers(deployment)[0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_k8s_config_map_holds_a_valid_gateway_config(
    kustomization: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    settings = k8s_settings(kustomization)
    assert settings.state.backend == "redis"
    redis_url = urlsplit(settings.state.redis_url)
    service = of_kind(manifests, "Service")[str(redis_url.hostname)]
    assert redis_url.port in {p["port"] for p in service["spec"]["ports"]}
    (generator,) = kustomization["configMapGenerator"]
    gateway = of_kind(manifests, "Deployment")["pdgate-gateway"]
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    (config_volume,) = [v for v in volumes if "configMap" in v]
    assert config_volume["configMap"]["name"] == generator["name"]
    (container,) = containers(gateway)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == config_volume["name"]]
    name, args = parse_command(container["args"])
    assert name == "serve"
    key = Path(generator["files"][0].split("=")[0]).name
    assert str(args.config) == f"{mount['mountPath']}/{key}"
    assert args.host == "0.0.0.0"
    port = args.port or settings.server.port
    assert {p["containerPort"] for p in container["ports"]} == {port}


def pod_ip_args(container: dict[str, Any]) -> list[str]:
    """A container's args with ``$(VAR)`` references expanded as the kubelet would."""
    env = {e["name"]: e for e in container.get("env", [])}

    def expand(match: re.Match[str]) -> str:
        assert env[match[1]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        return "10.0.0.7"

    return [re.sub(r"\$\((\w+)\)", expand, a) for a in container["args"]]


def test_k8s_backends_are_labelled_by_role_behind_headless_services(
    kustomization: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    """Each worker URL is a headless Service selecting the Deployment of the pool's role, on
    the port its pods listen on; pods advertise their own IP for the KV pull."""
    deployments, services = of_kind(manifests, "Deployment"), of_kind(manifests, "Service")
    settings = k8s_settings(kustomization)
    roles = set()
    for role, worker in http_workers(settings):
        url = urlsplit(worker.url)
        service = services[str(url.hostname)]
        assert service["spec"]["clusterIP"] == "None", f"{url.hostname}: not headless"
        selector = service["spec"]["selector"]
        (deployment,) = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["pdgate/role"] == deployment["metadata"]["labels"]["pdgate/role"] == role
        (container,) = containers(deployment)
        name, args = parse_command(pod_ip_args(container))
        assert name == "backend"
        check_backend_args(args)
        assert args.role == role
        assert args.host == "0.0.0.0"
        assert args.advertise_host == "10.0.0.7"
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        (named,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert named["containerPort"] == args.port
        roles.add(role)
    assert roles == {"prefill", "decode"}


def test_k8s_gateway_autoscales_with_cpu_requests_and_no_fixed_replicas(
    manifests: list[dict[str, Any]],
) -> None:
    (hpa,) = of_kind(manifests, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    deployment = of_kind(manifests, target["kind"])[target["name"]]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    for container in containers(deployment):
        assert container["resources"]["requests"]["cpu"]
    service = of_kind(manifests, "Service")[deployment["metadata"]["name"]]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_pods_have_probes_on_real_routes_and_resource_requests(
    manifests: list[dict[str, Any]],
) -> None:
    gateway_paths, backend_paths = gateway_routes(), backend_routes()
    probed: set[str] = set()
    for name, deployment in of_kind(manifests, "Deployment").items():
        for container in containers(deployment):
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            probes = [container.get(p) for p in ("livenessProbe", "readinessProbe")]
            assert all(probes), f"{name}: liveness and readiness probes"
            if container.get("image", "").split(":")[0] != PDGATE_IMAGE:
                continue
            command = container["args"][0]
            known = gateway_paths if command == "serve" else backend_paths
            for probe in probes:
                path = probe["httpGet"]["path"]
                assert path in known, f"{name}: probes {path}, not a route"
                if command == "serve":
                    probed.add(path)
    assert probed == {"/health", "/ready"}


def test_k8s_images_and_users_match_the_dockerfile(
    kustomization: dict[str, Any], manifests: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    (image,) = kustomization["images"]
    assert image["name"] == PDGATE_IMAGE
    built = {s["image"] for s in pdgate_services(compose).values()}
    assert built == {f"{image['name']}:{image['newTag']}"}, "compose builds what k8s runs"
    uid = int(docker("USER")[0].split(":")[0])
    ours = 0
    for deployment in of_kind(manifests, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        if containers(deployment)[0]["image"] == PDGATE_IMAGE:
            assert pod["securityContext"]["runAsUser"] == uid
            assert pod["securityContext"]["runAsNonRoot"] is True
            ours += 1
    assert ours == 3
    (namespace,) = of_kind(manifests, "Namespace")
    assert kustomization["namespace"] == namespace


# -- docs/replicas.md ---------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """Each command line of the replicas page of the docs, split as bash would."""
    section = (ROOT / "docs" / "replicas.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words.pop()
            if words:
                commands.append(words)
    return commands


def test_documented_replica_commands_match_the_shipped_files(compose: dict[str, Any]) -> None:
    commands = readme_commands()
    images = {s["image"] for s in pdgate_services(compose).values()}
    backends: dict[int, argparse.Namespace] = {}
    gateways: list[tuple[argparse.Namespace, Settings]] = []
    redis_ports = []
    for words in commands:
        if words[0] == "pdgate":
            name, args = parse_command(words[1:])
            if name == "backend":
                check_backend_args(args)
                backends[args.port] = args
            else:
                assert name == "serve"
                gateways.append((args, gateway_config(ROOT / args.config)))
        elif words[0] == "redis-server":
            redis_ports.append(int(flag(words, "--port") or 6379))
        elif words[:2] == ["docker", "compose"]:
            assert (ROOT / str(flag(words, "-f"))).resolve() == DEPLOY / "compose.yaml"
        elif words[:2] == ["docker", "build"]:
            assert words[-1] == "."
            assert {flag(words, "-t")} == images
        elif words[:2] == ["kind", "load"]:
            assert {words[-1]} == images
        elif words[:2] == ["kubectl", "apply"]:
            assert (ROOT / str(flag(words, "-k"))).resolve() == K8S
    assert len(gateways) == 2
    assert len({args.port for args, _ in gateways}) == 2
    assert set(redis_ports) == {
        urlsplit(s.state.redis_url).port for _, s in gateways if s.state.backend == "redis"
    }
    for _, settings in gateways:
        for role, worker in http_workers(settings):
            url = urlsplit(worker.url)
            assert url.hostname == "127.0.0.1"
            assert url.port in backends, f"{worker.url}: no backend started on that port"
            assert backends[url.port].role in (role, "both")


def test_k8s_network_policies_fence_the_backends_and_redis(
    manifests: list[dict[str, Any]],
) -> None:
    """Only the gateway (and, for backends, each other) may reach backends and Redis."""
    policies = of_kind(manifests, "NetworkPolicy")
    deployments = of_kind(manifests, "Deployment")

    def selected(policy: dict[str, Any]) -> set[str]:
        labels = policy["spec"]["podSelector"]["matchLabels"]
        return {
            name
            for name, d in deployments.items()
            if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        }

    def sources(policy: dict[str, Any]) -> set[str]:
        out = set()
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                labels = peer.get("podSelector", {}).get("matchLabels")
                if labels is None:
                    continue
                out |= {
                    name
                    for name, d in deployments.items()
                    if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                }
        return out

    by_target = {frozenset(selected(p)): p for p in policies.values()}
    backends = frozenset({"pdgate-prefill", "pdgate-decode"})
    assert backends in by_target
    assert sources(by_target[backends]) == {"pdgate-gateway", *backends}
    assert frozenset({"pdgate-redis"}) in by_target
    assert sources(by_target[frozenset({"pdgate-redis"})]) == {"pdgate-gateway"}


def test_k8s_backends_and_gateway_share_the_generated_control_token(
    kustomization: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    secrets = {g["name"] for g in kustomization.get("secretGenerator", [])}
    for name, deployment in of_kind(manifests, "Deployment").items():
        if name == "pdgate-redis":
            continue
        env = {e["name"]: e for c in containers(deployment) for e in c.get("env", [])}
        ref = env["PDGATE_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, name


def test_compose_backends_and_gateways_share_the_control_token(compose: dict[str, Any]) -> None:
    tokens = {
        name: service.get("environment", {}).get("PDGATE_CONTROL_TOKEN")
        for name, service in compose["services"].items()
        if service.get("image") == "pdgate:local"
    }
    assert len(tokens) == 4
    assert len(set(tokens.values())) == 1
    assert None not in tokens.values()
