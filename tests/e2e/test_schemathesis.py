"""The OpenAPI document proven against a real `whatslike serve` (embedded default) by
schemathesis: requests generated from the document, valid and invalid, each answer
checked against it (no 5xx; a documented status, content type, headers and body; invalid
input refused with a 4xx; a missing token refused), then chains of calls along the
document's links (create a conversation → send a message → read it, its conversation's
messages and changes).

The response schemas are checked closed (no property the document does not name), so a
field added to an answer without its model fails here. The run is bounded: `EXAMPLES`
cases per operation and `STATEFUL_RUNS` chains of at most `STEPS` calls, from a fixed
seed so that a failure comes back the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis.strategies import SearchStrategy
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.openapi.checks import JsonSchemaError

from tests.e2e.conftest import Server, start_server, stop_server
from tests.e2e.test_inbound import PHONE
from whatslike.connectors.meta import SIGNATURE_HEADER, sign
from whatslike.settings import DEV_SECRETS
from whatslike.simulator import payloads

AnyOperation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[AnyOperation]

#: The first bytes of the upload types whose content is checked (whatslike/media/limits).
PNG_HEAD = b"\x89PNG\r\n\x1a\n"
SIGNATURES = {"image/png": PNG_HEAD, "image/jpeg": b"\xff\xd8\xff", "application/pdf": b"%PDF-"}

EXAMPLES = 25
STATEFUL_RUNS = 20
STEPS = 6
SEED = 16
ORG = "org-schemathesis"
#: A target of the webhook endpoints made here: valid, and never reached (.invalid).
WEBHOOK_URL = "https://crm.whatslike.invalid/hooks"


def closed(document: dict[str, Any]) -> dict[str, Any]:
    """The document with every object schema of its components closed to the properties
    it names (those that allow more, like Meta's webhook body, say so and stay open)."""
    for schema in document["components"]["schemas"].values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    return document


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Customers' messages to the number go to the organization of the test's token.
    running = start_server(
        tmp_path_factory.mktemp("schemathesis"), {"WHATSLIKE_WHATSAPP_ORG_ID": ORG}
    )
    yield running
    stop_server(running)


@dataclass(frozen=True)
class Known:
    """A conversation and a message of the token's organization, the message sent (it has
    its provider id), a customer's message in that conversation, a campaign, and two
    webhook endpoints (one for the deletes, so the others still find theirs): half the
    cases of an operation that takes one use these ids. Half the valid cases of adding an
    endpoint use a valid https URL (the fuzzed ones never are)."""

    token: str
    conversation_id: str
    message_id: str
    provider_message_id: str
    inbound_message_id: str
    campaign_id: str
    endpoint_id: str
    spare_endpoint_id: str
    #: A medium of the token's organization, and the signed link of its bytes.
    media_id: str
    media_link: httpx.URL

    def fixed(self, operation: AnyOperation, mode: GenerationMode) -> dict[str, Any]:
        names = {parameter.name for parameter in operation.iter_parameters()}
        if "endpoint_id" in names:
            chosen = (
                self.spare_endpoint_id if operation.method.upper() == "DELETE" else self.endpoint_id
            )
            return {"path_parameters": {"endpoint_id": chosen}}
        if operation.path == "/api/webhooks" and operation.method.upper() == "POST":
            return {"body": {"url": WEBHOOK_URL}} if mode.is_positive else {}
        if {"id", "message_id"} <= names:
            ids = {"id": self.conversation_id, "message_id": self.inbound_message_id}
            return {"path_parameters": ids}
        if "sig" in names:
            return {
                "path_parameters": {"media_id": self.media_id},
                "query": dict(self.media_link.params),
            }
        if "media_id" in names:
            return {"path_parameters": {"media_id": self.media_id}}
        if "id" in names:
            return {"path_parameters": {"id": self.conversation_id}}
        if "campaign_id" in names:
            return {"path_parameters": {"campaign_id": self.campaign_id}}
        if "message_id" in names:
            return {"path_parameters": {"message_id": self.message_id}}
        if "provider_message_id" in names:
            return {"query": {"provider_message_id": self.provider_message_id}}
        return {}


@pytest.fixture(scope="module")
def known(served: Server) -> Known:
    token = served.token(ORG)
    with httpx.Client(
        base_url=served.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        created = client.post("/api/conversations", json={"channel": "whatsapp", "contact": "+55"})
        conversation_id = created.json()["id"]
        sent = client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "oi"})
        message_id = sent.json()["message_id"]
        deadline = time.monotonic() + 20
        while (message := client.get(f"/api/messages/{message_id}").json())[
            "provider_message_id"
        ] is None:
            assert time.monotonic() < deadline, f"the message was never sent: {message}"
            time.sleep(0.05)
        reply = payloads.whatsapp_message("+55", "wamid.schemathesis", int(time.time()), "oi")
        webhook = payloads.whatsapp_message_webhook(PHONE, "+55", [reply])
        body = json.dumps(webhook).encode()
        signature = sign(DEV_SECRETS["meta_app_secret"], body)
        answer = client.post(
            "/webhooks/whatsapp", content=body, headers={SIGNATURE_HEADER: signature}
        )
        assert answer.status_code == 200, answer.text
        listed = client.get(f"/api/conversations/{conversation_id}/messages").json()["messages"]
        [inbound] = [m["id"] for m in listed if m["direction"] == "in"]
        campaign = client.post(
            "/api/campaigns",
            json={
                "client_campaign_id": "known",
                "channel": "whatsapp",
                "message": {"type": "text", "text": "oi"},
                "contacts": ["+5511"],
            },
        )
        assert campaign.status_code == 202, campaign.text
        endpoint, spare_endpoint = (
            client.post("/api/webhooks", json={"url": WEBHOOK_URL}).json()["id"] for _ in range(2)
        )
        media = client.post(
            "/api/media", content=PNG_HEAD + b"\x00", headers={"Content-Type": "image/png"}
        ).json()
    return Known(
        token,
        conversation_id,
        message_id,
        message["provider_message_id"],
        inbound,
        campaign.json()["id"],
        endpoint,
        spare_endpoint,
        media["id"],
        httpx.URL(media["url"]),
    )


def load(served: Server, known: Known, document: dict[str, Any]) -> BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "base-url": served.url,
            "headers": {"Authorization": f"Bearer {known.token}"},
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES},
        }
    )
    return schemathesis.openapi.from_dict(closed(document), config=config)


def served_document(served: Server) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(served.url + "/openapi.json", timeout=10).json()
    return document


@pytest.fixture(scope="module")
def api_schema(served: Server, known: Known) -> BaseSchema:
    return load(served, known, served_document(served))


def prepare(case: AnyCase, mode: GenerationMode) -> dict[str, Any]:
    """What a valid case needs beyond its schema: Meta's signature over the exact body,
    the verify token of the handshake (this server's, the embedded default's), and an
    upload's first bytes of its type (what no schema can say: the content is checked)."""
    if mode.is_positive and case.path == "/api/media":
        raw = case.body if isinstance(case.body, bytes) else str(case.body or "").encode()
        return {"data": SIGNATURES.get(str(case.media_type), b"") + raw + b"\x00"}
    if not mode.is_positive or not case.path.startswith("/webhooks/"):
        return {}
    if case.method == "GET":
        assert case.query is not None
        case.query["hub.verify_token"] = DEV_SECRETS["meta_verify_token"]
        return {}
    body = json.dumps(case.body).encode()
    assert case.headers is not None
    case.headers[SIGNATURE_HEADER] = sign(DEV_SECRETS["meta_app_secret"], body)
    return {"data": body}


def checked(
    cases: SearchStrategy[AnyCase], mode: GenerationMode, seen: Counter[int]
) -> Callable[[], None]:
    """A Hypothesis test of `cases`: each one sent, its answer validated, its status counted."""

    @hypothesis.given(case=cases)
    @SETTINGS
    def each(case: AnyCase) -> None:
        response = case.call_and_validate(**prepare(case, mode))
        seen[response.status_code] += 1

    return each


def run_each_operation(
    api_schema: BaseSchema, known: Known, mode: GenerationMode
) -> tuple[list[str], dict[str, Counter[int]]]:
    """Run `EXAMPLES` cases of `mode` on every operation that has an input to get wrong
    (negative cases need one: the token is not one); the failures, one per operation, and
    the statuses seen."""
    failures = []
    statuses: dict[str, Counter[int]] = {}
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        # The token (a security scheme's header) is not an input negative cases change.
        inputs = [p for p in operation.iter_parameters() if p.name != "Authorization"]
        if not mode.is_positive and not (operation.body or inputs):
            continue
        seen = statuses.setdefault(operation.label, Counter())

        cases = operation.as_strategy(generation_mode=mode)
        fixed = known.fixed(operation, mode)
        if fixed:
            cases = cases | operation.as_strategy(generation_mode=mode, **fixed)

        try:
            checked(cases, mode, seen)()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis's FailureGroup
            failures.append(f"{operation.label} ({mode}): {exc}")
    return failures, statuses


SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def test_valid_requests_are_served_as_the_contract_says(
    api_schema: BaseSchema, known: Known
) -> None:
    failures, statuses = run_each_operation(api_schema, known, GenerationMode.POSITIVE)
    assert not failures, "\n\n".join(failures)
    print(statuses)
    # Not a run of 401s and 404s: each operation was served (the token, the signature and
    # the verify token work), with ids the document's examples do not make up.
    unserved = {
        label: dict(seen)
        for label, seen in statuses.items()
        if not any(200 <= status < 300 for status in seen)
    }
    assert not unserved, unserved


def test_invalid_requests_are_refused_as_the_contract_says(
    api_schema: BaseSchema, known: Known
) -> None:
    failures, statuses = run_each_operation(api_schema, known, GenerationMode.NEGATIVE)
    assert not failures, "\n\n".join(failures)
    print(statuses)


def test_chains_of_calls_along_the_links_keep_the_contract(
    api_schema: BaseSchema, known: Known
) -> None:
    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: AnyCase) -> dict[str, Any]:
            # An upload's body gets the first bytes of its type, as in the tests above; a
            # message's medium is one that exists (a made-up id is a 404, which the chain
            # would take for the conversation just created not being found).
            if isinstance(case.body, dict) and case.body.get("media_id"):
                case.body["media_id"] = known.media_id
            # A medium or a template goes to the known WhatsApp conversation: on an
            # Instagram one it is a 422 that depends on the conversation's channel, which
            # no schema of the request can say.
            if isinstance(case.body, dict) and {"media_id", "template"} & case.body.keys():
                case.path_parameters = {**(case.path_parameters or {}), "id": known.conversation_id}
            return prepare(case, GenerationMode.POSITIVE) if case.path == "/api/media" else {}

    Machine.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_RUNS,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


def test_an_answer_the_document_does_not_describe_fails_the_run(
    served: Server, known: Known
) -> None:
    """The harness can fail: a document that lacks a field the server answers (as after
    a field added to `conversation_json` without its model) is caught."""
    document = served_document(served)
    answer = document["components"]["schemas"]["ConversationOut"]
    del answer["properties"]["contact"]
    answer["required"].remove("contact")
    operation = load(served, known, document)["/api/conversations"]["POST"]
    with pytest.raises(BaseExceptionGroup) as raised:
        checked(operation.as_strategy(), GenerationMode.POSITIVE, Counter())()
    [failure] = raised.value.exceptions
    assert isinstance(failure, JsonSchemaError), failure
    assert "'contact' was unexpected" in failure.message, failure.message


def test_the_coverage_phase_finds_nothing(served: Server, known: Known, tmp_path: Path) -> None:
    """Schemathesis's own runner, its coverage phase: for each operation, the boundary
    values of every schema (lengths, patterns, enums, missing and extra fields, wrong
    types) and the methods the path does not serve, with every check it has
    (`--checks all`: 405 with `Allow` included). Deterministic; its size is set by the
    document, not by a count."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{served.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {known.token}",
            "--phases",
            "coverage",
            # An upload's content is checked against its type (422), which no schema can
            # say; the tests above send it prepared bodies.
            "--exclude-operation-id",
            "uploadMedia",
            "--checks",
            "all",
            "--workers",
            "1",
            "--seed",
            str(SEED),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=tmp_path,  # whatever it writes stays out of the repository
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    summary = re.search(r"(\d+) generated", done.stdout)
    assert done.returncode == 0 and summary, done.stdout[-6000:] + done.stderr[-2000:]
    print(done.stdout[-1500:])
