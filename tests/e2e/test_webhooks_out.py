"""Outbound webhooks against receivers this test runs, through a real `whatslike serve`
(embedded: SQLite, the simulator's statuses): every status change arrives, verified with
the `standardwebhooks` library as a receiver would, in seq order per conversation; a
receiver that is down gets everything once it is up; a redirect is never followed; a
receiver that hangs does not hold
up another organization's; what is given up is parked, listed and replayed; a rotation
signs with both secrets; a `kill -9` of the server loses nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import OWN_SECRETS, Server, start_server, stop_server
from tests.store.conftest import fresh_cassandra_keyspace

WAIT_S = 60
#: Fast retries and polls, so the test's outages are short; a long retry period.
ENV = {
    "WHATSLIKE_WEBHOOK_ALLOW_PRIVATE": "true",
    "WHATSLIKE_WEBHOOK_POLL_S": "0.05",
    "WHATSLIKE_WEBHOOK_RETRY_FIRST_S": "0.05",
    "WHATSLIKE_WEBHOOK_RETRY_MAX_S": "0.3",
    "WHATSLIKE_WEBHOOK_TIMEOUT_S": "30",
    "WHATSLIKE_WEBHOOK_LEASE_S": "40",
    "WHATSLIKE_WEBHOOK_IN_FLIGHT": "2",
    "WHATSLIKE_SIM_DELAY_MS": "20",
}


@dataclass
class Target:
    """One receiving URL: what it answers, and what it got."""

    answer: int = 200
    #: A `Location` to answer with (a redirect).
    location: str = ""
    #: Bumped when the sender was killed: a request that began before is not recorded
    #: (its sender never saw the answer).
    epoch: int = 0
    #: While clear, a request waits (a receiver that hangs).
    open: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0
    #: (headers, body) of each request answered 2xx, in arrival order.
    delivered: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.open.set()


class Receiver:
    """An HTTP server on a free loopback port; each path is a `Target`."""

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                target = receiver.targets[self.path]
                began = target.epoch
                target.open.wait(WAIT_S)
                with receiver.lock:
                    target.attempts += 1
                    status = target.answer
                    if 200 <= status < 300 and target.epoch == began:
                        target.delivered.append((dict(self.headers.items()), body))
                self.send_response(status)
                if target.location:
                    self.send_header("location", target.location)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def target(self, path: str) -> tuple[str, Target]:
        self.targets[path] = Target()
        return f"http://127.0.0.1:{self.server.server_port}{path}", self.targets[path]

    def close(self) -> None:
        for target in self.targets.values():
            target.open.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("webhooks"), ENV)
    yield running
    stop_server(running)


def until(condition: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Org:
    """An organization's API client on a server."""

    def __init__(self, server: Server, org: str) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.url,
            headers={"Authorization": f"Bearer {server.token(org)}"},
            timeout=30,
        )

    def add_endpoint(self, url: str) -> dict[str, Any]:
        answer = self.http.post("/api/webhooks", json={"url": url})
        assert answer.status_code == 201, answer.text
        endpoint: dict[str, Any] = answer.json()
        self.server.secrets.add(endpoint["secret"])
        return endpoint

    def send(self, conversations: int, messages: int) -> list[str]:
        """`messages` messages in each of `conversations` new conversations; their ids."""
        ids = []
        for n in range(conversations):
            made = self.http.post(
                "/api/conversations", json={"channel": "whatsapp", "contact": f"+55{n}"}
            )
            conversation_id = made.json()["id"]
            for m in range(messages):
                sent = self.http.post(
                    f"/api/conversations/{conversation_id}/messages", json={"text": f"m{m}"}
                )
                assert sent.status_code == 202, sent.text
            ids.append(conversation_id)
        return ids

    def changes(self, conversation_id: str) -> list[int]:
        answer = self.http.get(f"/api/conversations/{conversation_id}/changes").json()
        assert answer["complete"]
        return [frame["seq"] for frame in answer["frames"]]

    def all_read(self, conversation_ids: list[str]) -> bool:
        return all(
            message["status"] == "READ"
            for conversation_id in conversation_ids
            for message in self.http.get(f"/api/conversations/{conversation_id}/messages").json()[
                "messages"
            ]
        )


def received(target: Target, *secrets: str) -> dict[str, list[int]]:
    """The seqs each conversation's deliveries carried, first arrivals only (at least
    once: a duplicate has the same `webhook-id`), each verified with every secret."""
    seen: set[str] = set()
    seqs: dict[str, list[int]] = {}
    for headers, body in list(target.delivered):
        for secret in secrets:
            event = Webhook(secret).verify(body, headers)
        assert event["type"] == "message.status"
        frame = event["data"]
        assert headers["webhook-id"] == f"{frame['conversation_id']}:{frame['seq']}"
        if headers["webhook-id"] in seen:
            continue
        seen.add(headers["webhook-id"])
        seqs.setdefault(frame["conversation_id"], []).append(frame["seq"])
    return seqs


def metric(server: Server, line: str) -> float:
    """The value of one line of the server's /metrics (`name{labels}`)."""
    for text in httpx.get(f"{server.url}/metrics").text.splitlines():
        name, _, value = text.rpartition(" ")
        if name == line:
            return float(value)
    raise AssertionError(f"no {line} in /metrics")


def complete(org: Org, target: Target, conversation_ids: list[str], secret: str) -> bool:
    """Every change of each conversation arrived, in seq order."""
    if not org.all_read(conversation_ids):
        return False
    got = received(target, secret)
    return all(got.get(c) == org.changes(c) for c in conversation_ids)


def test_every_change_arrives_signed_and_in_order(server: Server, receiver: Receiver) -> None:
    org = Org(server, "org-order")
    url, target = receiver.target("/order")
    endpoint = org.add_endpoint(url)
    conversations = org.send(conversations=3, messages=4)
    until(lambda: complete(org, target, conversations, endpoint["secret"]), "every change")
    # A wrong secret does not verify: the check above is real.
    with pytest.raises(Exception, match="No matching signature"):
        received(target, "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=")


def test_a_receiver_down_for_a_while_gets_everything_once_up(
    server: Server, receiver: Receiver
) -> None:
    org = Org(server, "org-down")
    url, target = receiver.target("/down")
    target.answer = 503
    endpoint = org.add_endpoint(url)
    conversations = org.send(conversations=2, messages=3)
    until(lambda: org.all_read(conversations), "the statuses")
    until(lambda: target.attempts >= 10, "retries")  # several per conversation, backing off
    assert target.delivered == []
    # The operator sees it: deliveries waiting ever longer (read every 5 s at most).
    oldest = "whatslike_webhook_oldest_pending_seconds"
    until(lambda: metric(server, oldest) > 0, "the age of the oldest pending delivery")
    assert metric(server, 'whatslike_webhook_deliveries_total{outcome="retried"}') >= 10
    target.answer = 200
    until(lambda: complete(org, target, conversations, endpoint["secret"]), "every change")
    until(lambda: metric(server, oldest) == 0, "no pending delivery left")


def test_a_redirect_is_a_failed_attempt_never_followed(server: Server, receiver: Receiver) -> None:
    org = Org(server, "org-redirect")
    url, target = receiver.target("/redirect")
    elsewhere_url, elsewhere = receiver.target("/elsewhere")
    target.answer, target.location = 307, elsewhere_url
    endpoint = org.add_endpoint(url)
    conversations = org.send(conversations=1, messages=1)
    until(lambda: target.attempts >= 3, "attempts")
    assert elsewhere.attempts == 0
    target.answer = 200
    until(lambda: complete(org, target, conversations, endpoint["secret"]), "every change")
    assert elsewhere.attempts == 0


def test_a_hanging_receiver_delays_only_its_organization(
    server: Server, receiver: Receiver
) -> None:
    slow, fast = Org(server, "org-slow"), Org(server, "org-fast")
    slow_url, slow_target = receiver.target("/slow")
    fast_url, fast_target = receiver.target("/fast")
    slow_target.open.clear()
    slow_endpoint = slow.add_endpoint(slow_url)
    fast_endpoint = fast.add_endpoint(fast_url)
    # More conversations than requests in flight per endpoint: the slow endpoint holds
    # as many connections as it may, all to the host the other one shares.
    slow_conversations = slow.send(conversations=3, messages=2)
    fast_conversations = fast.send(conversations=2, messages=2)
    until(
        lambda: complete(fast, fast_target, fast_conversations, fast_endpoint["secret"]),
        "the other organization's changes",
    )
    assert slow_target.delivered == []  # all that time, the slow one's requests hung
    slow_target.open.set()
    until(
        lambda: complete(slow, slow_target, slow_conversations, slow_endpoint["secret"]),
        "the slow organization's changes",
    )


def test_a_rotation_signs_with_both_secrets(server: Server, receiver: Receiver) -> None:
    org = Org(server, "org-rotate")
    url, target = receiver.target("/rotate")
    endpoint = org.add_endpoint(url)
    rotated = org.http.post(f"/api/webhooks/{endpoint['id']}/rotate")
    assert rotated.status_code == 200, rotated.text
    fresh = rotated.json()
    server.secrets.add(fresh["secret"])
    assert fresh["secret"] != endpoint["secret"]
    assert fresh["previous_secret_valid_until"] is not None
    listed = org.http.get("/api/webhooks").json()["endpoints"]
    assert [e["id"] for e in listed] == [endpoint["id"]]
    assert "secret" not in listed[0]  # shown once
    conversations = org.send(conversations=1, messages=1)
    until(lambda: complete(org, target, conversations, fresh["secret"]), "every change")
    # The same deliveries verify with the secret before the rotation too.
    received(target, endpoint["secret"], fresh["secret"])


def test_given_up_deliveries_are_parked_then_replayed(tmp_path: Path, receiver: Receiver) -> None:
    running = start_server(tmp_path, {**ENV, "WHATSLIKE_WEBHOOK_RETRY_FOR_S": "1"})
    try:
        org = Org(running, "org-park")
        url, target = receiver.target("/park")
        target.answer = 500
        endpoint = org.add_endpoint(url)
        conversations = org.send(conversations=1, messages=2)
        until(lambda: org.all_read(conversations), "the statuses")
        expected = len(org.changes(conversations[0]))
        parked_path = f"/api/webhooks/{endpoint['id']}/parked"

        def parked() -> list[dict[str, Any]]:
            deliveries: list[dict[str, Any]] = org.http.get(parked_path).json()["deliveries"]
            return deliveries

        until(lambda: len(parked()) == expected, "every delivery parked")
        parked_total = 'whatslike_webhook_deliveries_total{outcome="parked"}'
        assert metric(running, parked_total) == expected
        first = parked()[0]
        assert first["last_error"] == "HTTP 500" and first["attempts"] >= 1
        assert json.loads(first["body"])["data"]["seq"] == 1
        target.answer = 200
        replay = org.http.post(f"/api/webhooks/{endpoint['id']}/replay")
        assert replay.json() == {"replayed": expected}
        until(lambda: complete(org, target, conversations, endpoint["secret"]), "the replay")
        assert parked() == []
        delivered = 'whatslike_webhook_deliveries_total{outcome="delivered"}'
        assert metric(running, delivered) == expected
    finally:
        stop_server(running)


def test_nothing_is_lost_across_a_kill_9(tmp_path: Path, receiver: Receiver) -> None:
    # The killed sender's lease of the endpoint lapses after WEBHOOK_LEASE_S: short here.
    env = {**ENV, "WHATSLIKE_WEBHOOK_LEASE_S": "6", "WHATSLIKE_WEBHOOK_TIMEOUT_S": "5"}
    running = start_server(tmp_path, env)
    org = Org(running, "org-kill")
    url, target = receiver.target("/kill")
    endpoint = org.add_endpoint(url)
    # Every status applied first (the simulator's statuses still on their way die with
    # the process, which is not what this test is about), the deliveries held back; then
    # the receiver comes up and the process is killed mid-delivery.
    target.answer = 503
    conversations = org.send(conversations=4, messages=5)
    until(lambda: org.all_read(conversations), "the statuses")
    target.answer = 200
    until(lambda: len(target.delivered) >= 5, "the first deliveries")
    target.open.clear()  # the requests under way hang: the kill finds them unanswered
    os.kill(running.process.pid, signal.SIGKILL)
    target.epoch += 1
    running.process.wait(timeout=30)
    assert running.reader is not None
    running.reader.join(timeout=15)
    assert running.leaked() == []
    restarted = start_server(tmp_path, env)
    target.open.set()
    try:
        again = Org(restarted, "org-kill")
        until(lambda: complete(again, target, conversations, endpoint["secret"]), "every change")
    finally:
        restarted.secrets |= running.secrets
        stop_server(restarted)


@pytest.mark.cassandra
async def test_on_cassandra_every_change_arrives_in_order_after_an_outage(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The same pipeline with the store on Cassandra: deliveries queued with the changes,
    retried while the receiver answers 503, then all delivered, in seq order."""
    async with fresh_cassandra_keyspace() as url:
        env = {
            **ENV,
            **OWN_SECRETS,
            "WHATSLIKE_ROLES": "api,router,connector,status-worker,simulator,webhook-sender",
            "WHATSLIKE_DATABASE_URL": url,
        }
        running = start_server(tmp_path, env)
        try:
            org = Org(running, "org-cassandra")
            target_url, target = receiver.target("/cassandra")
            target.answer = 503
            endpoint = org.add_endpoint(target_url)
            conversations = org.send(conversations=2, messages=3)
            until(lambda: org.all_read(conversations), "the statuses")
            until(lambda: target.attempts >= 4, "retries")
            assert target.delivered == []
            target.answer = 200
            until(lambda: complete(org, target, conversations, endpoint["secret"]), "every change")
        finally:
            stop_server(running)
