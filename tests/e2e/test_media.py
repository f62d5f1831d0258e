"""Media through a real `whatslike serve`, on the local store (embedded default) and on
the real S3 server of scripts/services.sh: an upload, its short-lived URL fetched with no
token, another organization's 404, and refusals (size while streaming, type, content)
that leave nothing stored. The server's log is checked for the S3 secret (stop_server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiobotocore.session import get_session
from botocore.config import Config

from tests.e2e.conftest import Server, start_server, stop_server
from tests.e2e.test_inbound import socket_of
from whatslike.media.inbound import MediaFetchFailed, fetch_inbound_media
from whatslike.media.limits import MB
from whatslike.media.local import LocalMediaStore
from whatslike.media.store import org_key
from whatslike.settings import DEV_SECRETS, load_settings

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)


def s3_env() -> dict[str, str]:
    return {
        "WHATSLIKE_MEDIA_STORE": "s3",
        "WHATSLIKE_MEDIA_S3_ENDPOINT": os.environ["WHATSLIKE_TEST_S3_URL"],
        "WHATSLIKE_MEDIA_S3_BUCKET": os.environ["WHATSLIKE_TEST_S3_BUCKET"],
        "WHATSLIKE_MEDIA_S3_ACCESS_KEY": os.environ["WHATSLIKE_TEST_S3_ACCESS_KEY"],
        "WHATSLIKE_MEDIA_S3_SECRET_KEY": os.environ["WHATSLIKE_TEST_S3_SECRET_KEY"],
    }


@pytest.fixture(scope="module", params=["local", "s3"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = s3_env() if request.param == "s3" else {}
    running = start_server(tmp_path_factory.mktemp(f"media-{request.param}"), env)
    running.secrets |= {value for name, value in env.items() if name.endswith("SECRET_KEY")}
    yield running
    stop_server(running)


async def stored_for(served: Server, org: str) -> list[str]:
    """Every object or file kept for this organization (bytes or record)."""
    if not _on_s3(served):
        folder = served.data_dir / "media" / org_key(org)
        return [path.name for path in folder.glob("*")] if folder.exists() else []
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=os.environ["WHATSLIKE_TEST_S3_URL"],
        region_name="us-east-1",
        aws_access_key_id=os.environ["WHATSLIKE_TEST_S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["WHATSLIKE_TEST_S3_SECRET_KEY"],
        config=config,
    ) as s3:
        listed = await s3.list_objects_v2(
            Bucket=os.environ["WHATSLIKE_TEST_S3_BUCKET"], Prefix=f"media/{org_key(org)}/"
        )
        return [item["Key"] for item in listed.get("Contents", [])]


def _on_s3(served: Server) -> bool:
    return "media-s3" in served.data_dir.name


@pytest.fixture
async def client(served: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        yield client


def auth(served: Server, org: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {served.token(org)}"}


async def test_round_trip_and_another_org(served: Server, client: httpx.AsyncClient) -> None:
    org = f"media-{os.urandom(4).hex()}"
    uploaded = await client.post(
        "/api/media",
        params={"filename": "photo.png"},
        content=PNG,
        headers={**auth(served, org), "Content-Type": "image/png"},
    )
    assert uploaded.status_code == 201, uploaded.text
    media = uploaded.json()
    assert (media["kind"], media["size"], media["filename"]) == ("image", len(PNG), "photo.png")
    again = await client.get(f"/api/media/{media['id']}", headers=auth(served, org))
    assert again.status_code == 200
    url = again.json()["url"]
    assert os.environ["WHATSLIKE_TEST_S3_BUCKET"] in url if _on_s3(served) else "/media/" in url
    async with httpx.AsyncClient() as anyone:  # no token: the URL is the credential
        fetched = await anyone.get(url)
    assert fetched.status_code == 200
    assert fetched.content == PNG
    assert fetched.headers["content-type"] == "image/png"
    other = await client.get(f"/api/media/{media['id']}", headers=auth(served, "someone-else"))
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"


async def test_refusals_store_nothing(served: Server, client: httpx.AsyncClient) -> None:
    org = f"media-{os.urandom(4).hex()}"
    headers = auth(served, org)

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        # Just over the limit in small chunks, so the client has sent it all when the 413
        # comes (a client still writing would see the connection closed instead).
        yield PNG
        for _ in range(5 * MB // 65_536 + 1):
            yield b"\x00" * 65_536

    too_large = await client.post(
        "/api/media", content=streamed(), headers={**headers, "Content-Type": "image/png"}
    )
    assert too_large.status_code == 413
    assert "5000000 bytes" in too_large.json()["error"]["message"]
    gif = await client.post(
        "/api/media", content=b"GIF89a", headers={**headers, "Content-Type": "image/gif"}
    )
    assert gif.status_code == 415
    assert gif.json()["error"]["code"] == "unsupported_media_type"
    mismatch = await client.post(
        "/api/media", content=b"<html>" * 10, headers={**headers, "Content-Type": "image/jpeg"}
    )
    assert mismatch.status_code == 422
    assert await stored_for(served, org) == []


async def test_inbound_media_is_fetched_from_graph(tmp_path: Path) -> None:
    """A customer's medium held by the simulator, fetched the way Graph serves it (the
    media URL, then its bytes, both with the access token) into a store."""
    server = start_server(tmp_path / "serve")
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            held = await client.post(
                "/simulator/media", content=PNG, headers={"Content-Type": "image/png"}
            )
        graph_id = held.json()["id"]
        store = LocalMediaStore(tmp_path / "media", "http://h", b"k" * 32)
        await store.open()
        settings = load_settings()
        async with aiohttp.ClientSession() as http:
            record = await fetch_inbound_media(
                http,
                graph_url=f"{server.url}/simulator",
                api_version=settings.graph_api_version,
                access_token=DEV_SECRETS["meta_access_token"],
                graph_media_id=graph_id,
                org_id="acme",
                store=store,
            )
            assert record.size == len(PNG)
            assert record.sha256 == hashlib.sha256(PNG).hexdigest()
            assert await store.record("acme", record.id) == record
            with pytest.raises(MediaFetchFailed):
                await fetch_inbound_media(
                    http,
                    graph_url=f"{server.url}/simulator",
                    api_version=settings.graph_api_version,
                    access_token="not-the-token",
                    graph_media_id=graph_id,
                    org_id="acme",
                    store=store,
                )
    finally:
        stop_server(server)


async def test_a_send_by_link_is_fetched_by_the_simulator(
    served: Server, client: httpx.AsyncClient
) -> None:
    """The simulator, like Meta, fetches a medium sent by link before it accepts the send:
    a handed-out URL is accepted; the same URL tampered with, or a medium of another kind
    than the send says, is refused with 131053."""
    org = f"media-{os.urandom(4).hex()}"
    uploaded = await client.post(
        "/api/media", content=PNG, headers={**auth(served, org), "Content-Type": "image/png"}
    )
    link = uploaded.json()["url"]
    graph = f"/simulator/{load_settings().graph_api_version}/109876543210987/messages"
    graph_auth = {"Authorization": f"Bearer {DEV_SECRETS['meta_access_token']}"}

    async def send(kind: str, url: str) -> httpx.Response:
        body = {
            "messaging_product": "whatsapp",
            "to": "5511988877665",
            "type": kind,
            kind: {"link": url, "caption": "your receipt"},
        }
        return await client.post(graph, json=body, headers=graph_auth)

    accepted = await send("image", link)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["messages"][0]["id"].startswith("wamid.")
    tampered = link.replace("sig=", "sig=0").replace("Signature=", "Signature=0")
    for refused in (await send("image", tampered), await send("document", link)):
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == 131053


async def test_a_message_with_a_medium_is_sent_by_link(
    served: Server, client: httpx.AsyncClient
) -> None:
    """An image sent in a WhatsApp conversation: the connector sends its link, the
    simulator fetches it and accepts the send (SENT, then its statuses); the message
    keeps its medium. Another organization's medium, or an Instagram conversation, is
    refused before anything is stored."""
    org = f"media-{os.urandom(4).hex()}"
    headers = auth(served, org)
    media = (
        await client.post(
            "/api/media", content=PNG, headers={**headers, "Content-Type": "image/png"}
        )
    ).json()
    conversation = (
        await client.post(
            "/api/conversations",
            json={"channel": "whatsapp", "contact": "5511988877665"},
            headers=headers,
        )
    ).json()
    messages = f"/api/conversations/{conversation['id']}/messages"
    # No caption: sent as a text, its empty body would be refused (FAILED).
    sent = await client.post(messages, json={"media_id": media["id"]}, headers=headers)
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["message_id"]
    deadline = time.monotonic() + 20
    while (message := (await client.get(f"/api/messages/{message_id}", headers=headers)).json())[
        "status"
    ] == "PENDING":
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)
    assert message["status"] in ("SENT", "DELIVERED", "READ"), message
    assert (message["media_id"], message["text"], message["error"]) == (media["id"], "", None)

    other = await client.post(
        messages, json={"media_id": media["id"]}, headers=auth(served, "someone-else")
    )
    assert other.status_code == 404
    foreign = (
        await client.post(
            "/api/conversations",
            json={"channel": "whatsapp", "contact": "5511"},
            headers=auth(served, "someone-else"),
        )
    ).json()
    stolen = await client.post(
        f"/api/conversations/{foreign['id']}/messages",
        json={"media_id": media["id"]},
        headers=auth(served, "someone-else"),
    )
    assert stolen.status_code == 404
    assert stolen.json()["error"]["message"] == "no such media"
    instagram = (
        await client.post(
            "/api/conversations", json={"channel": "instagram", "contact": "1784"}, headers=headers
        )
    ).json()
    on_instagram = f"/api/conversations/{instagram['id']}/messages"
    captioned = await client.post(
        on_instagram, json={"media_id": media["id"], "text": "oi"}, headers=headers
    )
    assert (captioned.status_code, captioned.json()["error"]["code"]) == (
        422,
        "media_unsupported",
    )
    text_file = (
        await client.post(
            "/api/media", content=b"notes", headers={**headers, "Content-Type": "text/plain"}
        )
    ).json()
    plain = await client.post(on_instagram, json={"media_id": text_file["id"]}, headers=headers)
    assert (plain.status_code, plain.json()["error"]["code"]) == (422, "media_unsupported")
    # An image goes as an attachment by its signed URL, which the simulator fetches.
    attached = await client.post(on_instagram, json={"media_id": media["id"]}, headers=headers)
    assert attached.status_code == 202, attached.text
    attached_id = attached.json()["message_id"]
    deadline = time.monotonic() + 20
    while (sent_ig := (await client.get(f"/api/messages/{attached_id}", headers=headers)).json())[
        "status"
    ] == "PENDING":
        assert time.monotonic() < deadline, sent_ig
        await asyncio.sleep(0.05)
    assert sent_ig["status"] in ("SENT", "READ"), sent_ig
    long_caption = await client.post(
        messages, json={"media_id": media["id"], "text": "x" * 1025}, headers=headers
    )
    assert long_caption.status_code == 400


async def customer_sends(
    client: httpx.AsyncClient, channel: str, contact: str, media_id: str, text: str = ""
) -> None:
    """The simulator's customer sends a medium it holds (a signed webhook to us)."""
    body = {"channel": channel, "contact": contact, "media_id": media_id, "text": text}
    answer = await client.post("/simulator/reply", json=body)
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("channel", ["whatsapp", "instagram"])
async def test_a_customers_image_arrives_stored_and_is_recovered_with_since(
    served: Server, client: httpx.AsyncClient, channel: str
) -> None:
    """A customer's image (WhatsApp: a Graph media id, fetched with the token; Instagram:
    an attachment URL, fetched without) is fetched into the store after the webhook's
    200, and its message announced with it: the `message` frame names its media id,
    whose URL gives the very bytes; the same frame comes back with `since`, and the list
    says where the medium is. A medium Meta does not give (Graph answers 404) ends
    `failed`, its message announced all the same."""
    served.secrets.add(DEV_SECRETS["meta_access_token"])  # never in the server's log
    contact = f"55119{int.from_bytes(os.urandom(4)) % 10**8:08d}"
    token = served.token("demo")
    headers = {"Authorization": f"Bearer {token}"}
    held = await client.post("/simulator/media", content=PNG, headers={"Content-Type": "image/png"})
    conversation = (
        await client.post(
            "/api/conversations", json={"channel": channel, "contact": contact}, headers=headers
        )
    ).json()["id"]
    agent = await socket_of(served, token)
    since = (await agent.subscribe(conversation))["seq"]

    await customer_sends(client, channel, contact, held.json()["id"], "o recibo")
    frame = await agent.next_of("message", wait_s=30)
    assert (frame["conversation_id"], frame["seq"], frame["text"]) == (
        conversation,
        since + 1,
        "" if channel == "instagram" else "o recibo",  # Instagram has no captions
    )
    media = frame["media"]
    assert (media["kind"], media["content_type"], media["state"], media["error"]) == (
        "image",
        "image/png",
        "stored",
        None,
    )
    url = (await client.get(f"/api/media/{media['media_id']}", headers=headers)).json()["url"]
    async with httpx.AsyncClient() as browser:
        assert (await browser.get(url)).content == PNG
    changes = await client.get(
        f"/api/conversations/{conversation}/changes", params={"since": since}, headers=headers
    )
    assert changes.json()["frames"] == [frame]
    [listed] = (
        await client.get(f"/api/conversations/{conversation}/messages", headers=headers)
    ).json()["messages"]
    assert (listed["media_id"], listed["media"]) == (media["media_id"], media)

    await customer_sends(client, channel, contact, "4040404040404040")  # held by nobody
    failed = await agent.next_of("message", wait_s=30)
    assert failed["seq"] == since + 2
    assert (failed["media"]["state"], failed["media"]["media_id"]) == ("failed", None)
    assert "404" in failed["media"]["error"]
    await agent.connection.close()
