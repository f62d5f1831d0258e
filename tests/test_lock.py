"""The hashed locks (`make lock`) agree with pyproject.toml on Linux x86_64 and aarch64
under Python 3.11, and `make` installs from them: again only when a lock changed. Each
check returns the problems it found; the `*_caught` tests feed it broken input."""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"

#: Where the locks must hold: the image's and the developers' platforms.
PLATFORMS = {
    machine: {
        "python_version": "3.11",
        "python_full_version": "3.11.16",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
    }
    for machine in ("x86_64", "aarch64")
}


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: int

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str:
        return str(self.requirement.specifier).removeprefix("==")


def pins(text: str) -> list[Pin]:
    """The pins of a lock, one per logical line (continuations joined, comments dropped)."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    logical.append(current.strip())
    result = []
    for entry in filter(None, logical):
        requirement, *hashes = entry.split(" --hash=")
        result.append(Pin(Requirement(requirement), sum(h.startswith("sha256:") for h in hashes)))
    return result


def applying(lock: Iterable[Pin], env: Mapping[str, str]) -> dict[str, list[Pin]]:
    chosen: dict[str, list[Pin]] = {}
    for pin in lock:
        marker = pin.requirement.marker
        if marker is None or marker.evaluate(dict(env)):
            chosen.setdefault(pin.name, []).append(pin)
    return chosen


def lock_problems(lock: list[Pin], wanted: Iterable[str]) -> list[str]:
    """Every pin exact and hashed; on each platform one pin per package, and every wanted
    requirement that applies there pinned at a version it allows."""
    problems = [
        f"{pin.requirement} is not pinned exactly with hashes"
        for pin in lock
        if pin.hashes == 0 or not str(pin.requirement.specifier).startswith("==")
    ]
    for machine, env in PLATFORMS.items():
        chosen = applying(lock, env)
        problems += [
            f"{machine}: {name} is pinned {len(found)} times"
            for name, found in chosen.items()
            if len(found) > 1
        ]
        for line in wanted:
            want = Requirement(line)
            if want.marker is not None and not want.marker.evaluate(dict(env)):
                continue
            found = chosen.get(canonicalize_name(want.name), [])
            if not found:
                problems.append(f"{machine}: {want.name} is not in the lock")
            elif not want.specifier.contains(version := found[0].version, prereleases=True):
                problems.append(f"{machine}: {want.name}=={version} is not {want.specifier}")
    return problems


def test_the_runtime_lock_pins_every_dependency() -> None:
    assert lock_problems(pins(LOCK.read_text()), PYPROJECT["project"]["dependencies"]) == []


def test_the_test_lock_pins_the_test_tools_and_the_runtime_pins_unchanged() -> None:
    project = PYPROJECT["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    test_lock = pins(TEST_LOCK.read_text())
    assert lock_problems(test_lock, wanted) == []
    assert {str(p.requirement) for p in pins(LOCK.read_text())} <= {
        str(p.requirement) for p in test_lock
    }


def test_the_build_lock_pins_the_build_backend() -> None:
    wanted = PYPROJECT["build-system"]["requires"]
    assert lock_problems(pins(BUILD_LOCK.read_text()), wanted) == []


def test_a_stale_or_unhashed_lock_is_caught() -> None:
    lock = pins(LOCK.read_text())
    assert lock_problems(lock, ["starlette>=99"]) == [
        f"{machine}: starlette=={applying(lock, env)['starlette'][0].version} is not >=99"
        for machine, env in PLATFORMS.items()
    ]
    assert lock_problems(lock, ["left-pad"]) == [
        "x86_64: left-pad is not in the lock",
        "aarch64: left-pad is not in the lock",
    ]
    # Markers that do not apply to a platform leave it alone (colorama is Windows-only).
    assert lock_problems(lock, ["colorama ; sys_platform == 'win32'"]) == []
    unhashed = pins("pyjwt==2.10.1\nuvloop>=0.21 \\\n    --hash=sha256:00\n")
    assert lock_problems(unhashed, []) == [
        "pyjwt==2.10.1 is not pinned exactly with hashes",
        "uvloop>=0.21 is not pinned exactly with hashes",
    ]
    twice = pins("h11==0.16.0 --hash=sha256:aa\nh11==0.14.0 --hash=sha256:bb\n")
    assert "x86_64: h11 is pinned 2 times" in lock_problems(twice, [])


# --- make installs from the locks ---------------------------------------------------------


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A stand-in virtualenv whose stamps are newer than every file they depend on."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    (tmp_path / ".installed").touch()
    (tmp_path / ".installed-test").touch()
    return tmp_path


def make(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_make_run_installs_nothing_when_nothing_changed(venv: Path) -> None:
    assert make(venv, "-q", "install").returncode == 0
    assert make(venv, "-q", "install-test").returncode == 0
    assert make(venv, "-n", "run").stdout.splitlines() == [f"{venv}/bin/whatslike serve"]


@pytest.mark.parametrize(
    ("target", "lock"),
    [("install", "requirements.lock"), ("install-test", "requirements-test.lock")],
)
def test_a_changed_lock_is_installed_with_its_hashes(venv: Path, target: str, lock: str) -> None:
    plan = make(venv, "-n", "-W", lock, target).stdout.splitlines()
    assert plan == [
        f"{venv}/bin/pip install --quiet --require-hashes -r {lock} -r requirements-build.lock",
        f"{venv}/bin/pip install --quiet --no-deps --no-build-isolation -e .",
        f"{venv}/bin/pip check >/dev/null || {{ {venv}/bin/pip check; "
        'echo "make: the locks miss a dependency: run make lock" >&2; exit 1; }',
        *(
            [f"touch {venv}/.installed"]
            if target == "install"
            else [f"touch {venv}/.installed-test {venv}/.installed"]
        ),
    ]
