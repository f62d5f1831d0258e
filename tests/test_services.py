"""`scripts/services.sh status|stop` on a Redis of a copy of the scripts of its own (a
checkout of their own, on a free port): stop ends the server of this checkout's pid file,
and nothing else, whatever the pid file or the .env files say."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def services(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(checkout / "scripts" / "services.sh"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def running(pid: int) -> bool:
    """The process runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    """The scripts in a directory of their own, with their own .services/; any Redis left
    running there is stopped afterwards."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: run scripts/services.sh redis first", pytrace=False)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    yield tmp_path
    pid_file = tmp_path / ".services" / "redis" / "redis.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if running(pid) and "redis-server" in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGKILL)


def test_status_and_stop_follow_the_server_this_checkout_started(checkout: Path) -> None:
    assert services(checkout, "redis").returncode == 0
    pid = int((checkout / ".services" / "redis" / "redis.pid").read_text())
    port = (checkout / ".services" / "redis.env").read_text().split("PORT=")[1].split()[0]

    status = services(checkout, "status", "redis")
    assert (status.returncode, status.stdout) == (
        0,
        f"redis: running (pid {pid}) on 127.0.0.1:{port}\n",
    )

    stop = services(checkout, "stop", "redis")
    assert stop.returncode == 0, stop.stderr
    assert not running(pid)
    assert not (checkout / ".services" / "redis" / "redis.pid").exists()

    status = services(checkout, "status", "redis")
    assert (status.returncode, status.stdout) == (3, "redis: stopped\n")
    again = services(checkout, "stop", "redis")
    assert (again.returncode, again.stdout) == (
        0,
        "services: Redis is not running from this checkout\n",
    )


def test_stop_leaves_alone_a_server_it_did_not_start(checkout: Path, tmp_path: Path) -> None:
    """Another checkout's Redis, named by copied .env files, answers (status says so) but
    is not stopped; nor is a process whose pid a stale pid file holds."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(checkout / "scripts", other / "scripts")
    assert services(other, "redis").returncode == 0
    theirs = int((other / ".services" / "redis" / "redis.pid").read_text())
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (checkout / ".services" / "redis").mkdir(parents=True)
        shutil.copy(other / ".services" / "redis.env", checkout / ".services" / "redis.env")
        (checkout / ".services" / "redis" / "redis.pid").write_text(f"{bystander.pid}\n")

        status = services(checkout, "status", "redis")
        assert status.returncode == 0
        assert "not started from this checkout" in status.stdout
        stop = services(checkout, "stop")
        assert stop.returncode == 0, stop.stderr
        assert "services: Redis is not running from this checkout" in stop.stdout
        assert running(theirs)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        services(other, "stop", "redis")
        if running(theirs):  # the stop failed: the test fails below, nothing is left
            os.kill(theirs, signal.SIGKILL)
    assert not running(theirs)


def test_an_unknown_service_is_refused(checkout: Path) -> None:
    result = services(checkout, "status", "mongodb")
    assert (result.returncode, result.stderr) == (2, "services: no such service 'mongodb'\n")
