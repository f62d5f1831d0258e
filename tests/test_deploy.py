"""The deployment files (Dockerfile, deploy/) checked for structure, since no Docker engine
runs here: every service, build reference, setting name, dependency, port, scrape target
and dashboard query matches the code. Each check is a function returning the problems it
found; the `*_catches_*` tests feed it a broken copy to prove it can fail."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from whatslike.settings import DEV_SECRETS, ROLES, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CASSANDRA = DEPLOY / "docker-compose.cassandra.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
METRICS = ROOT / "whatslike" / "metrics.py"

BACKENDS = {"kafka", "redis", "cassandra", "postgres", "prometheus", "grafana", "s3"}
WHATSLIKE = {
    "api-1",
    "api-2",
    "status-worker-1",
    "status-worker-2",
    "router",
    "connector",
    "webhook-sender",
    "simulator",
}
#: The roles that share the bus and the store.
PIPELINE = WHATSLIKE - {"simulator"}
SETTING_VARIABLES = {f"WHATSLIKE_{name.upper()}" for name in Settings.model_fields}
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD")

Services = dict[str, dict[str, Any]]


def load_yaml(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(path.read_text()))


def services_of(compose: Mapping[str, Any]) -> Services:
    return cast(Services, compose["services"])


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of Compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def roles(service: Mapping[str, Any]) -> list[str]:
    return [role.strip() for role in environment(service).get("WHATSLIKE_ROLES", "").split(",")]


def listen_port(service: Mapping[str, Any]) -> int:
    port = environment(service).get("WHATSLIKE_PORT")
    return int(port) if port else cast(int, Settings.model_fields["port"].default)


def merged(base: Services, override: Services) -> Services:
    """Compose's merge of an override file, for the keys these files use: mappings
    (environment, depends_on) merge key by key, everything else is replaced."""
    result = copy.deepcopy(base)
    for name, service in override.items():
        target = result.setdefault(name, {})
        for key, value in service.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return result


# --- the checks ---------------------------------------------------------------------------


def unknown_settings(text: str) -> list[str]:
    """`WHATSLIKE_*` names in a file that are not settings."""
    used = set(re.findall(r"\bWHATSLIKE_[A-Z0-9_]+", text))
    return sorted(used - SETTING_VARIABLES)


def dev_secret_hits(files: Mapping[str, str]) -> list[str]:
    return [
        f"{name} holds the development {setting}"
        for name, text in files.items()
        for setting, value in DEV_SECRETS.items()
        if value in text
    ]


def literal_secrets(services: Services) -> list[str]:
    """Secret-looking variables whose value is written in the file instead of coming from
    deploy/.env (a `${VAR...}` interpolation)."""
    return [
        f"{name}: {variable} is a literal"
        for name, service in services.items()
        for variable, value in environment(service).items()
        if any(word in variable for word in SECRET_WORDS) and not value.startswith("${")
    ]


def dependency_problems(services: Services) -> list[str]:
    problems = []
    for name, service in services.items():
        if "healthcheck" not in service:
            problems.append(f"{name} has no healthcheck")
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for target, rule in depends.items():
            if target not in services:
                problems.append(f"{name} depends on {target}, which does not exist")
            elif "healthcheck" not in services[target]:
                problems.append(f"{name} depends on {target}, which has no healthcheck")
            if rule.get("condition") != "service_healthy":
                problems.append(f"{name} -> {target}: condition is not service_healthy")
    return problems


#: Restart policies that bring back a process that exits, however often (a bounded
#: `on-failure:N` gives up; a role that stays down leaves its work PENDING).
RESTARTING = {"unless-stopped", "always", "on-failure"}


def without_restart(services: Services) -> list[str]:
    """Services Docker would leave down after their process exits (a kill, a failed
    start)."""
    return [
        f"{name}: restart is {service.get('restart', 'no')!r}"
        for name, service in services.items()
        if service.get("restart") not in RESTARTING
    ]


def published_ports(services: Services) -> Iterator[tuple[str, str]]:
    for name, service in services.items():
        for port in service.get("ports") or []:
            spec = str(port["published"]) if isinstance(port, dict) else str(port)
            parts = spec.split(":")
            # host:container or ip:host:container; the host port is next to the last.
            yield name, parts[-2] if len(parts) > 1 else parts[0]


def port_collisions(services: Services) -> list[str]:
    seen: dict[str, str] = {}
    problems = []
    for name, host_port in published_ports(services):
        if host_port in seen:
            problems.append(f"host port {host_port}: {seen[host_port]} and {name}")
        seen[host_port] = name
    return problems


def scrape_problems(services: Services, prometheus: Mapping[str, Any]) -> list[str]:
    """Every Whatslike service scraped at its port with the metrics token, nothing else
    scraped with it, the token file being the secret Compose gives Prometheus."""
    secrets = services["prometheus"].get("secrets") or []
    mounted = {
        f"/run/secrets/{entry['target'] if isinstance(entry, dict) else entry}" for entry in secrets
    }
    scraped: set[str] = set()
    problems = []
    for job in prometheus["scrape_configs"]:
        targets = {t for group in job["static_configs"] for t in group["targets"]}
        if not job["job_name"].startswith("whatslike"):
            continue
        scraped |= targets
        auth = job.get("authorization") or {}
        if auth.get("credentials_file") not in mounted:
            problems.append(f"job {job['job_name']} reads no token Compose mounts")
    expected = {
        f"{name}:{listen_port(service)}" for name, service in services.items() if name in WHATSLIKE
    }
    problems += [f"{target} is not scraped" for target in sorted(expected - scraped)]
    problems += [f"{target} is scraped but is no service" for target in sorted(scraped - expected)]
    return problems


def declared_series(metrics_source: str) -> set[str]:
    """The series names whatslike/metrics.py declares (histograms as their three series)."""
    series = set()
    for kind, name in re.findall(
        r"\b(Counter|Gauge|Histogram)\(\s*\"(whatslike_\w+)\"", metrics_source
    ):
        if kind == "Histogram":
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            series.add(name)
    return series


def dashboard_expressions(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets") or []:
                yield panel["title"], str(target.get("expr", ""))
            yield from walk(panel.get("panels") or [])

    yield from walk(cast(list[dict[str, Any]], dashboard["panels"]))


def dashboard_problems(dashboard: Mapping[str, Any], metrics_source: str) -> list[str]:
    known = declared_series(metrics_source)
    problems = []
    for title, expr in dashboard_expressions(dashboard):
        if not expr.strip():
            problems.append(f"panel {title!r} has an empty query")
        problems += [
            f"panel {title!r} queries {name}, which whatslike/metrics.py does not declare"
            for name in re.findall(r"\bwhatslike_\w+", expr)
            if name not in known
        ]
    return problems


def dockerfile_problems(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    problems = []
    if len(stages) < 2:
        problems.append("not multi-stage (fewer than two FROM)")
    if not any(re.match(r"FROM python:3\.11\S*-slim", line) for line in stages[-1:]):
        problems.append("the runtime stage is not a slim Python 3.11")
    last_stage = text[text.rfind(stages[-1]) :] if stages else text
    users = re.findall(r"^USER\s+(\S+)", last_stage, flags=re.MULTILINE)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the runtime stage runs as root (no non-root USER)")
    if "--from=builder" not in last_stage and "from=builder" not in last_stage:
        problems.append("the runtime stage takes nothing from the builder")
    if 'ENTRYPOINT ["whatslike"]' not in text or 'CMD ["serve"]' not in text:
        problems.append('ENTRYPOINT ["whatslike"] / CMD ["serve"] missing')
    if not re.search(r"^HEALTHCHECK\b.*/healthz", text, flags=re.MULTILINE | re.DOTALL):
        problems.append("no HEALTHCHECK on /healthz")
    if re.search(r"^(ENV|ARG)\b.*(SECRET|TOKEN|PASSWORD)", text, flags=re.MULTILINE):
        problems.append("a secret is baked into the image (ENV/ARG)")
    return problems + reproducibility_problems(text)


def reproducibility_problems(text: str) -> list[str]:
    """The image is built from pinned inputs only: every base image by digest, every
    dependency from the hashed lock, nothing else fetched by pip."""
    joined = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    problems = [
        f"{line.split()[1]} is not pinned by digest"
        for line in joined.splitlines()
        if re.match(r"FROM\s", line) and not re.search(r"@sha256:[0-9a-f]{64}\b", line)
    ]
    pips = [
        command.strip()
        for line in joined.splitlines()
        if line.startswith("RUN ")
        for command in line.removeprefix("RUN ").split("&&")
        if re.search(r"\bpip3? (install|wheel)\b", command)
    ]
    if not any("--require-hashes" in pip and "-r requirements.lock" in pip for pip in pips):
        problems.append("no pip command takes requirements.lock with --require-hashes")
    problems += [
        f"pip may fetch what no lock pins: {pip}"
        for pip in pips
        if "--require-hashes" not in pip
        and "--no-index" not in pip
        and not ("--no-deps" in pip and "--no-build-isolation" in pip)
    ]
    return problems


# --- the real files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> Services:
    return services_of(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def cassandra_services(services: Services) -> Services:
    return merged(services, services_of(load_yaml(CASSANDRA)))


def deployment_texts() -> dict[str, str]:
    files = [DOCKERFILE, DOCKERIGNORE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    return {str(path.relative_to(ROOT)): path.read_text() for path in files}


def test_every_service_exists(services: Services) -> None:
    assert set(services) == BACKENDS | WHATSLIKE


def test_one_compose_file_only() -> None:
    assert not (ROOT / "docker-compose.yml").exists(), "deploy/ is the one source of truth"


def test_every_whatslike_service_builds_from_the_dockerfile(services: Services) -> None:
    for name in WHATSLIKE:
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name
    assert DOCKERFILE.is_file()
    assert all("build" not in services[name] for name in BACKENDS)


def test_every_whatslike_variable_is_a_setting() -> None:
    for name, text in deployment_texts().items():
        assert unknown_settings(text) == [], name


def test_the_roles_are_real_and_named(services: Services, cassandra_services: Services) -> None:
    for name in WHATSLIKE:
        chosen = roles(services[name])
        assert chosen and set(chosen) <= set(ROLES), name
        # The hubs and workers run their role only, as their name says.
        assert chosen == [name.rsplit("-", 1)[0] if name[-1].isdigit() else name], name
    env = {name: environment(services[name]) for name in WHATSLIKE}
    for name in PIPELINE:
        assert env[name]["WHATSLIKE_BUS_URL"] == "kafka://kafka:9092", name
        assert env[name]["WHATSLIKE_DATABASE_URL"].startswith("postgresql://"), name
        assert "@postgres:5432/" in env[name]["WHATSLIKE_DATABASE_URL"], name
        cassandra_url = environment(cassandra_services[name])["WHATSLIKE_DATABASE_URL"]
        assert cassandra_url == "cassandra://cassandra:9042/whatslike", name
        assert "cassandra" in cassandra_services[name]["depends_on"], name
    for name in ("api-1", "api-2", "status-worker-1", "status-worker-2"):
        assert env[name]["WHATSLIKE_FANOUT_URL"] == "redis://redis:6379/0", name
    assert env["connector"]["WHATSLIKE_GRAPH_URL"] == "http://simulator:8000/simulator"
    assert env["simulator"]["WHATSLIKE_SIM_WEBHOOK_URL"] == "http://connector:8000"
    assert all(env[name]["WHATSLIKE_HOST"] == "0.0.0.0" for name in WHATSLIKE)


def test_no_development_secret_anywhere(services: Services, cassandra_services: Services) -> None:
    assert dev_secret_hits(deployment_texts()) == []
    assert literal_secrets(services) == []
    assert literal_secrets(cassandra_services) == []


def test_required_secrets_fail_when_missing_and_are_documented(services: Services) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?[^}]*deploy/\.env\}", text))
    optional = set(re.findall(r"\$\{(\w+):-[^}]*\}", text))
    documented = dict(
        line.partition("=")[::2]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {"WHATSLIKE_META_APP_SECRET", "WHATSLIKE_JWT_SECRET", "POSTGRES_PASSWORD"} <= required
    # Every interpolation is either required (fails when missing) or explicitly optional.
    assert set(re.findall(r"\$\{(\w+)", text)) == required | optional
    assert set(documented) == required | optional
    # The example holds no value: a copy left unfilled fails instead of running.
    assert all(value == "" for value in documented.values())
    for name in WHATSLIKE:
        assert environment(services[name])["WHATSLIKE_METRICS_TOKEN"].startswith(
            "${WHATSLIKE_METRICS_TOKEN:?"
        ), name
    assert (DEPLOY / ".gitignore").read_text().splitlines().count(".env") == 1


def test_every_dependency_exists_and_is_healthchecked(
    services: Services, cassandra_services: Services
) -> None:
    assert dependency_problems(services) == []
    assert dependency_problems(cassandra_services) == []


def test_every_service_comes_back_when_its_process_exits(
    services: Services, cassandra_services: Services
) -> None:
    assert without_restart(services) == []
    assert without_restart(cassandra_services) == []


def test_a_service_without_a_restart_policy_is_caught(services: Services) -> None:
    broken = copy.deepcopy(services)
    del broken["router"]["restart"]
    broken["connector"]["restart"] = "on-failure:3"
    assert without_restart(broken) == [
        "router: restart is 'no'",
        "connector: restart is 'on-failure:3'",
    ]


def test_published_ports_do_not_collide(services: Services) -> None:
    assert len(list(published_ports(services))) >= 4
    assert port_collisions(services) == []


def test_prometheus_scrapes_every_whatslike_service(services: Services) -> None:
    assert scrape_problems(services, load_yaml(PROMETHEUS)) == []
    secrets = load_yaml(COMPOSE)["secrets"]
    assert secrets["metrics_token"] == {"environment": "WHATSLIKE_METRICS_TOKEN"}
    mounts = [str(v).split(":") for v in services["prometheus"]["volumes"]]
    assert any(
        (DEPLOY / m[0]).resolve() == PROMETHEUS and m[1] == "/etc/prometheus/prometheus.yml"
        for m in mounts
    )


def test_grafana_provisioning_files_exist_and_agree(services: Services) -> None:
    mounts = {}
    for volume in services["grafana"]["volumes"]:
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            path = (DEPLOY / source).resolve()
            assert path.exists(), source
            mounts[target] = path
    datasources_dir = mounts["/etc/grafana/provisioning/datasources"]
    providers_dir = mounts["/etc/grafana/provisioning/dashboards"]
    uids = {
        source["uid"]
        for path in datasources_dir.glob("*.yml")
        for source in load_yaml(path)["datasources"]
    }
    dashboards = []
    for path in providers_dir.glob("*.yml"):
        for provider in load_yaml(path)["providers"]:
            folder = mounts[provider["options"]["path"]]
            dashboards += sorted(folder.glob("*.json"))
    assert dashboards, "no dashboard is provisioned"
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        assert dashboard_problems(dashboard, METRICS.read_text()) == [], path.name
        used = {
            target["datasource"]["uid"]
            for panel in dashboard["panels"]
            for target in panel.get("targets") or []
        }
        assert used <= uids, path.name


def test_the_dashboard_shows_the_pipeline() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "whatslike.json").read_text())
    queried = " ".join(expr for _, expr in dashboard_expressions(dashboard))
    for series in (
        "whatslike_status_applied_total",
        "whatslike_status_fanout_seconds_bucket",
        "whatslike_ws_connections",
        "whatslike_ws_frames_sent_total",
        "whatslike_bus_dead_letters_total",
        "whatslike_bus_consumer_lag",
    ):
        assert series in queried, series


def test_the_dockerfile_builds_a_slim_non_root_image() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    ignored = DOCKERIGNORE.read_text().splitlines()
    # An allow-list: everything is left out but what the wheel is built from.
    assert ignored[[line.startswith("#") for line in ignored].index(False)] == "*"
    assert {line for line in ignored if line.startswith("!")} == {
        "!pyproject.toml",
        "!requirements.lock",
        "!requirements-build.lock",
        "!README.md",
        "!whatslike/",
    }


# --- the checks fail on broken files ------------------------------------------------------


def test_a_misspelled_setting_is_caught() -> None:
    broken = COMPOSE.read_text().replace("WHATSLIKE_FANOUT_URL", "WHATSLIKE_FANOUT_ULR", 1)
    assert unknown_settings(broken) == ["WHATSLIKE_FANOUT_ULR"]


def test_a_development_secret_is_caught(services: Services) -> None:
    broken = copy.deepcopy(services)
    broken["connector"]["environment"]["WHATSLIKE_META_APP_SECRET"] = DEV_SECRETS["meta_app_secret"]
    assert literal_secrets(broken) == ["connector: WHATSLIKE_META_APP_SECRET is a literal"]
    text = yaml.safe_dump({"services": broken})
    assert dev_secret_hits({"compose": text}) == ["compose holds the development meta_app_secret"]


def test_a_dependency_without_healthcheck_is_caught(services: Services) -> None:
    broken = copy.deepcopy(services)
    del broken["redis"]["healthcheck"]
    broken["router"]["depends_on"]["zookeeper"] = {"condition": "service_healthy"}
    problems = dependency_problems(broken)
    assert "router depends on zookeeper, which does not exist" in problems
    assert "api-1 depends on redis, which has no healthcheck" in problems


def test_a_port_collision_is_caught(services: Services) -> None:
    broken = copy.deepcopy(services)
    broken["api-2"]["ports"] = ["8001:8000"]
    assert port_collisions(broken) == ["host port 8001: api-1 and api-2"]


def test_a_missing_scrape_target_is_caught(services: Services) -> None:
    prometheus = load_yaml(PROMETHEUS)
    for job in prometheus["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [t for t in group["targets"] if t != "status-worker-2:8000"]
    assert scrape_problems(services, prometheus) == ["status-worker-2:8000 is not scraped"]


def test_an_unknown_metric_in_the_dashboard_is_caught() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "whatslike.json").read_text())
    panel = next(p for p in dashboard["panels"] if p.get("targets"))
    panel["targets"][0]["expr"] = "rate(whatslike_ws_frames_send_total[1m])"
    assert dashboard_problems(dashboard, METRICS.read_text()) == [
        f"panel {panel['title']!r} queries whatslike_ws_frames_send_total, which "
        "whatslike/metrics.py does not declare"
    ]


def test_a_root_single_stage_dockerfile_is_caught() -> None:
    broken = "FROM python:3.11-slim\nCOPY . .\nRUN pip install .\nCMD whatslike serve\n"
    problems = dockerfile_problems(broken)
    assert "not multi-stage (fewer than two FROM)" in problems
    assert "the runtime stage runs as root (no non-root USER)" in problems
    assert "no HEALTHCHECK on /healthz" in problems


def test_an_unpinned_image_or_an_unlocked_install_is_caught() -> None:
    text = DOCKERFILE.read_text()
    unpinned = re.sub(r"@sha256:[0-9a-f]{64}", "", text)
    assert reproducibility_problems(unpinned) == [
        "python:3.11-slim-bookworm is not pinned by digest",
        "python:3.11-slim-bookworm is not pinned by digest",
    ]
    unlocked = text.replace("--require-hashes ", "").replace("--no-build-isolation ", "")
    problems = reproducibility_problems(unlocked)
    assert "no pip command takes requirements.lock with --require-hashes" in problems
    unlocked_wheels = "pip wheel --wheel-dir /wheels -r requirements.lock"
    assert f"pip may fetch what no lock pins: {unlocked_wheels}" in problems
    assert "pip may fetch what no lock pins: pip wheel --no-deps --wheel-dir /wheels ." in problems
    # The image before the locks: a tag, and `pip wheel .` resolving the ranges afresh.
    old = "FROM python:3.11-slim-bookworm AS builder\nRUN pip wheel --wheel-dir /wheels .\n"
    assert reproducibility_problems(old) == [
        "python:3.11-slim-bookworm is not pinned by digest",
        "no pip command takes requirements.lock with --require-hashes",
        "pip may fetch what no lock pins: pip wheel --wheel-dir /wheels .",
    ]
