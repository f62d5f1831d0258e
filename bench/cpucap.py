"""CPU caps for benchmarked processes: a Linux control group of its own per process,
whose CPU bandwidth is limited to a fraction of one core (`cpu.cfs_quota_us` under
cgroup v1's `cpu` controller, or `cpu.max` under cgroup v2).

What it is for: on a machine whose cores one process of each role already fills, adding
processes cannot show whether throughput grows with them. Capped, each process is a
smaller machine; the roles that scale out should then give about twice the throughput
with two capped processes as with one (`python -m bench.send --cpu-cap connector=0.3`).
Needs root (or a delegated cgroup tree); says so clearly otherwise."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

#: The scheduler's period the quota is a share of, in microseconds (the kernel's default).
PERIOD_US = 100_000

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


class CapUnavailable(RuntimeError):
    """This machine or user cannot cap a process's CPU."""


def parse_caps(items: list[str]) -> dict[str, float]:
    """`ROLE=CORES` items (`connector=0.3`) as a dict; ValueError on a bad one."""
    caps: dict[str, float] = {}
    for item in items:
        role, sep, cores = item.partition("=")
        if not sep or not role or float(cores) <= 0:
            raise ValueError(f"--cpu-cap wants ROLE=CORES (e.g. connector=0.3), got {item!r}")
        caps[role] = float(cores)
    return caps


@contextlib.contextmanager
def capped(pid: int, cores: float) -> Iterator[Path]:
    """Put process `pid` (all its threads) in a new control group limited to `cores` of
    one core for the block; the group is removed after it (the process must have left
    it by then, by ending)."""
    quota = max(1_000, int(cores * PERIOD_US))
    name = f"whatslike-bench-{uuid.uuid4().hex[:12]}"
    if (_V1 / "cpu.cfs_quota_us").exists():
        group = _V1 / name
        settings = {"cpu.cfs_period_us": str(PERIOD_US), "cpu.cfs_quota_us": str(quota)}
    elif "cpu" in _read(_V2 / "cgroup.subtree_control").split():
        group = _V2 / name
        settings = {"cpu.max": f"{quota} {PERIOD_US}"}
    else:
        raise CapUnavailable(
            "no cgroup cpu controller: neither /sys/fs/cgroup/cpu (v1) nor 'cpu' in"
            " /sys/fs/cgroup/cgroup.subtree_control (v2)"
        )
    try:
        group.mkdir()
        for setting, value in settings.items():
            (group / setting).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise CapUnavailable(f"cannot cap a process's CPU at {group}: {exc}") from exc
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):  # a process that outlived the block keeps it
            group.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
