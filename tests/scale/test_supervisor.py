"""deploy/supervisord.conf, the local "Run at scale" layout, run as shipped (its ports
moved to free ones, its paths to this checkout) on Kafka + Redis + PostgreSQL: every
role comes up, and a role killed with kill -9 is started again by supervisord and is
ready again, having waited out its dead Kafka member."""

from __future__ import annotations

import configparser
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.e2e.conftest import OWN_SECRETS, free_port
from tests.scale.harness import cluster_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "supervisord.conf"
BIN = Path(sys.executable).parent
#: A start waits out a rebalance (~10 s after a kill -9); the whole layout starts at once.
READY_S = 90.0


def programs(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return {
        section.removeprefix("program:"): dict(parser[section])
        for section in parser.sections()
        if section.startswith("program:")
    }


def test_every_role_of_the_layout_is_restarted_whatever_its_exit() -> None:
    """The file itself: the eight processes of the README, each restarted on any exit,
    never given up on, and given time to drain."""
    found = programs(CONFIG.read_text())
    assert set(found) == {
        "simulator",
        "connector",
        "router",
        "worker-1",
        "worker-2",
        "webhook-sender",
        "api-1",
        "api-2",
    }
    for name, program in found.items():
        assert program["autorestart"] == "true", name
        assert int(program["startretries"]) >= 1000, name
        assert int(program["stopwaitsecs"]) >= 30, name
        assert program["stopsignal"] == "TERM", name
        assert re.match(r"%\(here\)s/\.\./\.venv/bin/whatslike serve --roles ", program["command"])


def local_copy(workdir: Path) -> tuple[Path, dict[str, int]]:
    """The shipped file with each port moved to a free one and %(here)s/.. (the
    repository) spelled out; its run/ directory under `workdir`."""
    text = CONFIG.read_text()
    ports = {int(p): free_port() for p in set(re.findall(r"--port (\d+)", text))}
    for old, new in ports.items():
        text = re.sub(rf"(?<=[: ]){old}\b", str(new), text)
    run = workdir / "run"
    (run / "logs").mkdir(parents=True)
    text = text.replace("%(here)s/../run", str(run)).replace("./run/", f"{run}/")
    text = text.replace("%(here)s/../.venv/bin", str(BIN)).replace("%(here)s/..", str(ROOT))
    assert not [line for line in text.splitlines() if "%(here)s" in line and line[0] != ";"]
    config = workdir / "supervisord.conf"
    config.write_text(text)
    by_name = {
        name: ports[int(re.search(r"--port (\d+)", program["command"]).group(1))]  # type: ignore[union-attr]
        for name, program in programs(CONFIG.read_text()).items()
    }
    return config, by_name


@contextmanager
def supervised(config: Path, env: dict[str, str]) -> Iterator[None]:
    daemon = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(config), "shutdown"],
            capture_output=True,
            timeout=90,
            check=False,
        )
        try:
            daemon.wait(timeout=90)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def ctl(config: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "supervisorctl"), "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + READY_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {READY_S} s: {what}"
        time.sleep(0.2)


def test_a_role_killed_with_kill_9_is_started_again_and_ready(
    tmp_path: Path, kafka_url: str, redis_url: str, postgres_url: str, prefix: str
) -> None:
    config, ports = local_copy(tmp_path)
    env = {
        **cluster_env(kafka_url, redis_url, postgres_url, prefix),
        **OWN_SECRETS,
        "WHATSLIKE_JWT_SECRET": secrets.token_urlsafe(32),
    }
    with supervised(config, env):
        wait_for(lambda: all(ready(port) for port in ports.values()), "every role ready")
        before = int(ctl(config, "pid", "router").strip())
        os.kill(before, signal.SIGKILL)

        def started_again() -> bool:
            pid = ctl(config, "pid", "router").strip()
            return pid.isdigit() and int(pid) not in (0, before)

        wait_for(started_again, "supervisord started the router again")
        wait_for(lambda: ready(ports["router"]), "the restarted router ready")
        log = (tmp_path / "run" / "logs" / "router.log").read_text()
        assert log.count("Whatslike listening on") == 2, log[-2000:]
        assert "RUNNING" in ctl(config, "status", "router")
