"""The hub against the usual alternative, side by side in one run: Socket.IO 4 with the
Redis adapter (the peer, ../shared/bench-peer/) and `whatslike serve` (every role but the
simulator, SQLite store, in-process bus) on a
Redis fan-out, each pinned to core 0, loaded from core 1 by the same `load.mjs` (fan-out
latency at open-loop rates) and `storm.mjs` (idle memory, connect and reconnect storms).

    .venv/bin/python -m bench.peer                    # the full comparison, table at the end
    .venv/bin/python -m bench.peer --runs 3 --only wl # our hub alone, 3 runs

It copies the harness to a temporary directory and `npm install`s it there, starts its own
redis-server on a free port, gives our hub a SQLite store holding conversations c0…c(C-1)
of the token's organization (the harness PUBLISHes frames on `status:c<i>`), prints every
step as it comes, and writes the table to bench/README.md (between the markers there).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.serving import UNCAPPED
from whatslike.auth import TokenService
from whatslike.settings import load_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The shared harness: ../shared/bench-peer of the checkout (or of the main checkout, for
#: a worktree one level further down), or wherever BENCH_PEER_DIR says.
HARNESS_CANDIDATES = [
    REPO.parent / "shared" / "bench-peer",
    REPO.parent.parent / "shared" / "bench-peer",
]
README = HERE / "README.md"
BEGIN, END = "<!-- peer:begin -->", "<!-- peer:end -->"

SERVER_CORE, LOAD_CORE = "0", "1"
JWT_SECRET = "bench-peer-secret-0123456789abcdef"
ORG, USER = "org-bench", "agent-bench"
#: A hub's p99 bound for the headline figure (P1).
P99_BOUND_MS = 50.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile() -> None:
    """`ulimit -n` up to the hard limit, for this process and every child."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"server exited with {proc.returncode} before listening:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout_s} s")


@contextlib.contextmanager
def process(
    argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Result:
    target: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    storm: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any] | None:
        """The fastest step that kept p99 within the bound and lost nothing."""
        good = [s for s in self.steps if s["p99_ms"] <= P99_BOUND_MS and s["lost"] == 0]
        return max(good, key=lambda s: s["deliveries_per_s"]) if good else None


def node_json(
    argv: Sequence[str], env: dict[str, str], cwd: Path, label: str
) -> list[dict[str, Any]]:
    """Run one harness script on the load core; echo and collect its JSON lines."""
    lines: list[dict[str, Any]] = []
    with subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, "node", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.strip()
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            lines.append(record)
            say(f"{label}: {_brief(record)}")
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed with {proc.returncode}")
    return lines


def _brief(record: dict[str, Any]) -> str:
    keys = [
        *("rate", "deliveries_per_s", "p50_ms", "p99_ms", "p999_ms", "lost", "server_cpu_pct"),
        *("server_rss_mb", "others_pct_of_2cores", "attempt"),
        *("connect_s", "kb_per_conn", "reconnect_s", "errors"),
    ]
    return " ".join(f"{k}={record[k]}" for k in keys if k in record)


#: load.mjs numbers its frames with one counter for all conversations, so each
#: conversation sees seq 1, 101, 201, …: to our hub (protocol.md §4: a conversation's seqs
#: are gap-free) every frame says that 99 were lost, and it re-reads the store for each.
#: The copy numbers them per conversation, as the status worker does; Socket.IO ignores
#: seq, and `lost` is counted from the frames expected, not from seqs, so the race is
#: unchanged for the peer.
_GLOBAL_SEQ = (
    "let received = 0, stale = 0, step = -1, gseq = 0, closes = 0;",
    'publish("c" + (sent % C), ++gseq);',
)
_PER_CONVERSATION_SEQ = (
    "let received = 0, stale = 0, step = -1, closes = 0; const cseq = new Array(C).fill(0);",
    'publish("c" + (sent % C), ++cseq[sent % C]);',
)


def per_conversation_seqs(load: Path) -> None:
    text = load.read_text()
    for old, new in zip(_GLOBAL_SEQ, _PER_CONVERSATION_SEQ, strict=True):
        if text.count(old) != 1:
            raise SystemExit(f"{load}: the harness changed; cannot find {old!r}")
        text = text.replace(old, new)
    load.write_text(text)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.harness = work / "harness"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def install(self) -> None:
        found = [Path(os.environ["BENCH_PEER_DIR"])] if "BENCH_PEER_DIR" in os.environ else []
        harness = next((p for p in [*found, *HARNESS_CANDIDATES] if p.is_dir()), None)
        if harness is None:
            raise SystemExit("no bench-peer harness found (set BENCH_PEER_DIR)")
        shutil.copytree(harness, self.harness)
        for path in self.harness.rglob("*"):
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        self.harness.chmod(0o755)
        per_conversation_seqs(self.harness / "load.mjs")
        say(f"npm install in {self.harness}")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=self.harness, check=True
        )

    @contextlib.contextmanager
    def redis(self) -> Iterator[subprocess.Popen[bytes]]:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port)]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.work)]
        with process(argv, dict(os.environ), self.work / "redis.log") as proc:
            wait_port(self.redis_port, proc, self.work / "redis.log")
            say(f"redis-server on {self.redis_port} (pid {proc.pid})")
            yield proc

    def load_args(self) -> list[str]:
        a = self.args
        return [
            "--clients", str(a.clients), "--convs", str(a.convs), "--rates", a.rates,
            "--secs", str(a.secs), "--gate", str(a.gate), "--retries", str(a.retries),
        ]  # fmt: skip

    def storm_args(self) -> list[str]:
        a = self.args
        return [
            "--clients",
            str(a.storm_clients),
            "--convs",
            str(a.convs),
            "--settle",
            str(a.settle),
        ]

    def node_env(self) -> dict[str, str]:
        return {**os.environ, "REDIS_URL": self.redis_url}

    def race(self, target: str, url: str, pid: int, redis_pid: int, extra: list[str]) -> Result:
        result = Result(target)
        common = ["--target", target, "--url", url, "--serverpid", str(pid), *extra]
        say(f"{target}: load.mjs")
        with self.profiled(target, pid):
            lines = node_json(
                ["load.mjs", *common, "--redispid", str(redis_pid), *self.load_args()],
                self.node_env(), self.harness, target,
            )  # fmt: skip
        result.steps = [line for line in lines if "rate" in line]
        if self.args.storm_clients:
            say(f"{target}: storm.mjs")
            storm = node_json(
                ["storm.mjs", *common, *self.storm_args()], self.node_env(), self.harness, target
            )
            result.storm = storm[-1] if storm else {}
        return result

    @contextlib.contextmanager
    def profiled(self, target: str, pid: int) -> Iterator[None]:
        """With --profile, py-spy samples our hub during load.mjs (collapsed stacks)."""
        if not self.args.profile or target != "wl":
            yield
            return
        out = Path(self.args.profile).resolve()
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking"]
        argv += ["--format", "raw", "--output", str(out)]
        with process(argv, dict(os.environ), self.work / "py-spy.log") as spying:
            say(f"py-spy records the hub into {out}")
            yield
            spying.send_signal(signal.SIGINT)
            spying.wait(30)

    def peer(self, redis_pid: int) -> Result:
        port = free_port()
        env = {**self.node_env(), "PORT": str(port)}
        argv = ["taskset", "-c", SERVER_CORE, "node", "sio-server.mjs"]
        with process(argv, env, self.work / "sio.log", self.harness) as proc:
            wait_port(port, proc, self.work / "sio.log")
            say(f"peer: Socket.IO on {port} (pid {proc.pid}, core {SERVER_CORE})")
            return self.race("sio", f"http://127.0.0.1:{port}", proc.pid, redis_pid, [])

    def prepare_store(self, database: Path) -> None:
        """The schema (as the server makes it) and conversations c0…c(C-1) of ORG."""
        subprocess.run(
            [sys.executable, "-c", _SCHEMA, f"sqlite:///{database}"], check=True, cwd=REPO
        )
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO organizations (id, created_at) VALUES (?, ?)", (ORG, now)
            )
            db.executemany(
                "INSERT OR IGNORE INTO conversations (id, org_id, channel, contact, last_seq,"
                " created_at) VALUES (?, ?, 'whatsapp', ?, 0, ?)",
                [(f"c{i}", ORG, f"+1555{i:07d}", now) for i in range(self.args.convs)],
            )

    def hub(self, redis_pid: int, pythonpath: str | None = None) -> Result:
        port = free_port()
        data = self.work / f"wl-{port}"
        data.mkdir()
        database = data / "bench.db"
        self.prepare_store(database)
        env = {
            **os.environ,
            **UNCAPPED,
            # The in-process bus joins the pipeline's roles in one process (it refuses
            # `api` alone); they sit idle here: only the hub and the fan-out work.
            "WHATSLIKE_ROLES": "api,router,connector,status-worker",
            "WHATSLIKE_META_APP_SECRET": "bench-app-secret-0123456789",
            "WHATSLIKE_META_VERIFY_TOKEN": "bench-verify-token-0123456789",
            "WHATSLIKE_META_ACCESS_TOKEN": "bench-access-token-0123456789",
            "WHATSLIKE_HOST": "127.0.0.1",
            "WHATSLIKE_PORT": str(port),
            "WHATSLIKE_DATA_DIR": str(data),
            "WHATSLIKE_DATABASE_URL": f"sqlite:///{database}",
            "WHATSLIKE_FANOUT_URL": self.redis_url,
            "WHATSLIKE_JWT_SECRET": JWT_SECRET,
            # load.mjs's clients never send our `ping` (Socket.IO's protocol pings on its
            # own): with the default 25 s heartbeat the hub closes them as idle after 75 s,
            # mid-ladder (the gate alone may wait 90 s before a step).
            "WHATSLIKE_HEARTBEAT_S": "3600",
        }
        if pythonpath is not None:  # another checkout's package, imported first
            env["PYTHONPATH"] = pythonpath
        settings = load_settings(data_dir=data, jwt_secret=JWT_SECRET)
        token = TokenService.from_settings(settings, JWT_SECRET).mint(USER, ORG, 3600)
        whatslike = str(Path(sys.executable).with_name("whatslike"))
        argv = ["taskset", "-c", SERVER_CORE, whatslike, "serve", "--log-level", "warning"]
        log = self.work / f"wl-{port}.log"
        with process(argv, env, log) as proc:
            wait_port(port, proc, log)
            say(f"hub: whatslike serve on {port} (pid {proc.pid}, core {SERVER_CORE})")
            url = f"ws://127.0.0.1:{port}/ws/status"
            label = "wl" if pythonpath is None else "base"
            result = self.race("wl", url, proc.pid, redis_pid, ["--token", token])
            result.target = label
            return result


_SCHEMA = """
import asyncio, sys
from whatslike.store import open_store
async def main():
    store = open_store(sys.argv[1]); await store.open(); await store.close()
asyncio.run(main())
"""


def spread(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:g}"
    return f"{min(values):g} / {statistics.median(values):g} / {max(values):g}"


def table(results: dict[str, list[Result]], args: argparse.Namespace) -> str:
    def column(runs: list[Result]) -> list[str]:
        bests = [r.best for r in runs]
        ok = [b for b in bests if b is not None]

        def of(key: str) -> str:
            return spread([float(b[key]) for b in ok])

        def storm(key: str) -> str:
            return spread([float(r.storm[key]) for r in runs if key in r.storm])

        def per_delivery(r: Result) -> float | None:
            """Server CPU µs per delivery at the first step that lost nothing."""
            kept = [s for s in r.steps if s["lost"] == 0 and s["deliveries_per_s"]]
            if not kept or kept[0]["server_cpu_pct"] is None:
                return None
            cpu, rate = float(kept[0]["server_cpu_pct"]), float(kept[0]["deliveries_per_s"])
            return round(cpu * 1e4 / rate, 1)

        return [
            spread([float(b["deliveries_per_s"]) if b else 0.0 for b in bests]),
            f"{of('rate')}",
            of("p50_ms"),
            of("p99_ms"),
            of("p999_ms"),
            spread([float(sum(s["lost"] for s in r.steps)) for r in runs]),
            of("server_cpu_pct"),
            storm("kb_per_conn"),
            storm("connect_s"),
            storm("reconnect_s"),
            spread([v for v in map(per_delivery, runs) if v is not None]),
            storm("connect_server_cpu_s"),
            storm("reconnect_server_cpu_s"),
        ]

    rows = [
        f"deliveries/s at p99 ≤ {P99_BOUND_MS:g} ms, 0 lost (P1)",
        "… at publish rate (events/s)",
        "p50 ms (at that rate)",
        "p99 ms",
        "p99.9 ms",
        "lost (all steps)",
        "server CPU % of one core (at that rate)",
        f"RSS KB per idle connection ({args.storm_clients} conns, P2)",
        f"connect storm s ({args.storm_clients} clients, P4)",
        "reconnect storm s (P4)",
        "server CPU µs per delivery (first step with 0 lost)",
        "server CPU s, connect storm",
        "server CPU s, reconnect storm",
    ]
    targets = [t for t in ("sio", "base", "wl") if t in results]
    names = {
        "sio": "Socket.IO 4 + redis-adapter (peer)",
        "base": f"Whatslike hub, baseline ({args.baseline_label})",
        "wl": "Whatslike hub",
    }
    cols = {t: column(results[t]) for t in targets}
    head = "| | " + " | ".join(names[t] for t in targets) + " |\n"
    head += "|---|" + "---|" * len(targets) + "\n"
    body = "".join(
        f"| {row} | " + " | ".join(cols[t][i] for t in targets) + " |\n"
        for i, row in enumerate(rows)
    )
    runs = max(len(r) for r in results.values())
    spread_of = f"min / median / max of {runs} runs" if runs > 1 else "1 run"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"{stamp}, {platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}. Servers pinned to core "
        f"{SERVER_CORE}, load generator on core {LOAD_CORE}; {args.clients} clients over "
        f"{args.convs} conversations, rates {args.rates} events/s for {args.secs} s each, "
        f"gate {args.gate} %. {spread_of}.\n"
        f"Command: `.venv/bin/python -m bench.peer {' '.join(sys.argv[1:])}`\n\n"
    )
    return note + head + body + verdicts(results)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def verdicts(results: dict[str, list[Result]]) -> str:
    """Issue 9's targets beside the figures (medians of the runs): P1 ≥ twice the peer's
    deliveries/s at p99 ≤ 50 ms; P2 ≤ 10 KB per idle connection and below the peer; P4
    both storms faster than the peer."""
    if "sio" not in results or "wl" not in results:
        return ""

    def best(target: str) -> float | None:
        return _median(
            [float(r.best["deliveries_per_s"]) if r.best else 0.0 for r in results[target]]
        )

    def storm(target: str, key: str) -> float | None:
        return _median([float(r.storm[key]) for r in results[target] if key in r.storm])

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "**met**" if ok else "**not met**"

    ours, peer = best("wl"), best("sio")
    p1 = None if ours is None or peer is None else ours >= 2 * peer
    kb, peer_kb = storm("wl", "kb_per_conn"), storm("sio", "kb_per_conn")
    p2 = None if kb is None or peer_kb is None else kb <= 10 and kb < peer_kb
    lines = [
        f"- P1 (at least twice the peer's deliveries/s at p99 ≤ {P99_BOUND_MS:g} ms, 0 lost): "
        f"{ours:g} vs twice {peer:g} → {verdict(p1)}"
        if ours is not None and peer is not None
        else f"- P1: {verdict(None)}",
        f"- P2 (≤ 10 KB per idle connection and below the peer): {kb:g} KB vs {peer_kb:g} KB "
        f"→ {verdict(p2)}"
        if kb is not None and peer_kb is not None
        else f"- P2: {verdict(None)}",
    ]
    for key, name in (("connect_s", "connect storm"), ("reconnect_s", "reconnect storm")):
        mine, theirs = storm("wl", key), storm("sio", key)
        if mine is None or theirs is None:
            lines.append(f"- P4 {name}: {verdict(None)}")
        else:
            lines.append(
                f"- P4 {name} (faster than the peer): {mine:g} s vs {theirs:g} s "
                f"→ {verdict(mine < theirs)}"
            )
    return "\nTargets (issue 9; medians of the runs):\n" + "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    current = README.read_text() if README.exists() else ""
    block = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in current and END in current:
        before, rest = current.split(BEGIN, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        README.write_text(before + block + after)
    else:
        README.write_text(
            current.rstrip("\n") + "\n\n## Hub against the Socket.IO peer\n\n" + block
        )


def race(args: argparse.Namespace, results: dict[str, list[Result]]) -> None:
    """Run every target `args.runs` times, interleaved, into `results`."""
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.install()
        with bench.redis() as redis:
            for run in range(args.runs):
                for target in ("sio", "base", "wl"):
                    if (args.only and target not in args.only) or (
                        target == "base" and not args.baseline
                    ):
                        continue
                    say(f"run {run + 1}/{args.runs}: {target}")
                    if target == "sio":
                        result = bench.peer(redis.pid)
                    else:
                        result = bench.hub(redis.pid, args.baseline if target == "base" else None)
                    results.setdefault(target, []).append(result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--convs", type=int, default=100)
    parser.add_argument("--rates", default="500,1000,2000,3000,4000,5000")
    parser.add_argument("--secs", type=int, default=10)
    parser.add_argument("--gate", type=int, default=15, help="others' busy %% before a step")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--storm-clients", type=int, default=10_000, help="0: no storm")
    parser.add_argument("--settle", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=("sio", "base", "wl"))
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument(
        "--baseline",
        help="also race the whatslike package found in this directory (a copy of "
        "another commit's whatslike/, e.g. from `git archive`)",
    )
    parser.add_argument("--baseline-label", default="baseline", help="its column's name")
    parser.add_argument("--profile", help="py-spy our hub during load.mjs into this file")
    parser.add_argument(
        "--replay", help="no run: the table of the results an earlier run printed into this log"
    )
    args = parser.parse_args(argv)
    raise_nofile()
    results: dict[str, list[Result]] = {}
    if args.replay:
        for line in Path(args.replay).read_text().splitlines():
            if line.startswith('{"target"'):
                record = json.loads(line)
                result = Result(record["target"], record["steps"], record["storm"])
                results.setdefault(result.target, []).append(result)
    else:
        race(args, results)
    if not results:
        raise SystemExit("no results to tabulate")
    text = table(results, args)
    print("\n" + text)
    for target, runs in results.items():
        for r in runs:
            print(json.dumps({"target": target, "steps": r.steps, "storm": r.storm}))
    if not args.no_readme:
        write_readme(text)
        say(f"table written to {README.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
