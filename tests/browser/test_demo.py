"""The demo page in a real Chromium against real `whatslike serve` processes: ticks that
move live, a restart of the pipeline survived with every status seen once, in order, and
a phone-width layout that does not overflow."""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import FilePayload, Locator, Page, expect

from tests.browser.conftest import ARTIFACTS, NewPage, printed_demo_url, screenshot
from tests.e2e.conftest import Server, Split, split_deployment, stop_server


def start_chat(page: Page, channel: str, contact: str) -> str:
    """Create a conversation from the page; wait until it is followed live."""
    before = page.get_by_test_id("conversation").count()
    page.get_by_test_id("channel").select_option(channel)
    page.get_by_test_id("contact").fill(contact)
    page.get_by_test_id("create-conversation").click()
    conversations = page.get_by_test_id("conversation")
    expect(conversations).to_have_count(before + 1)
    row = conversations.last
    expect(row).to_have_attribute("aria-selected", "true")
    # Sending before the subscription is answered could let the first status pass by.
    expect(row).to_have_attribute("data-sub", "live")
    conversation_id = row.get_attribute("data-conversation-id")
    assert conversation_id
    return conversation_id


def send(page: Page, text: str) -> Locator:
    """Send a message from the composer; its row in the message list."""
    messages = page.get_by_test_id("message")
    before = messages.count()
    page.get_by_test_id("composer-text").fill(text)
    page.get_by_test_id("send").click()
    expect(messages).to_have_count(before + 1)
    message = messages.last
    expect(message).to_contain_text(text)
    return message


def assert_no_horizontal_overflow(page: Page) -> None:
    widths = page.evaluate(
        "({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"
    )
    assert widths["scroll"] <= widths["inner"], widths


def page_statuses(page: Page, conversation_id: str) -> list[dict[str, Any]]:
    statuses: list[dict[str, Any]] = page.evaluate(
        "(id) => window.demo.statuses.filter((s) => s.conversation_id === id)",
        conversation_id,
    )
    return statuses


def recovery_report(
    page: Page, conversation_id: str, stopped_at: float, restart_at: float, ready_at: float
) -> dict[str, Any]:
    """What the page went through around a restart, from its `window.demo` records: when it
    was open again, and which statuses came replayed (seq up to the resubscribe's answer)
    or live on the last connection."""
    demo: dict[str, Any] = page.evaluate(
        "({states: window.demo.states, subscriptions: window.demo.subscriptions,"
        " connections: window.demo.connections})"
    )
    statuses = page_statuses(page, conversation_id)
    opened_at = next(
        s["at"] / 1000
        for s in demo["states"]
        if s["state"] == "open" and s["at"] / 1000 > stopped_at
    )
    last_connection = demo["connections"]
    resubscribed = [
        s
        for s in demo["subscriptions"]
        if s["conversationId"] == conversation_id and s["connection"] == last_connection
    ]
    assert len(resubscribed) == 1, demo["subscriptions"]
    assert resubscribed[0]["recovered"] is True
    on_last = [s for s in statuses if s["connection"] == last_connection]
    replayed = [s for s in on_last if s["seq"] <= resubscribed[0]["seq"]]
    return {
        "reconnect_s_after_ready": round(opened_at - ready_at, 3),
        "reconnect_s_after_restart_began": round(opened_at - restart_at, 3),
        "pipeline_down_s": round(ready_at - stopped_at, 3),  # stop, start, until ready
        "replayed_status_frames": len(replayed),
        "live_status_frames_after_reconnect": len(on_last) - len(replayed),
        "statuses": [
            {key: s[key] for key in ("seq", "status", "message_id", "connection")} for s in statuses
        ],
        "states": [s["state"] for s in demo["states"]],
    }


def test_demo_link_shows_ticks_moving_live(embedded_server: Server, new_page: NewPage) -> None:
    url = printed_demo_url(embedded_server)
    assert url == f"{embedded_server.url}/demo"
    page = new_page(1440, 900)
    page.goto(url)

    state = page.get_by_test_id("conn-state")
    expect(state).to_have_text("open")  # a token in the link: it connects by itself
    page.get_by_test_id("disconnect").click()
    expect(state).to_have_text("closed")
    page.get_by_test_id("connect").click()
    expect(state).to_have_text("open")
    expect(page.get_by_test_id("disorder")).to_be_visible()  # the simulator runs here

    conversation_id = start_chat(page, "whatsapp", "5511988877665")
    message = send(page, "Olá Ana! Seu pedido #4821 saiu para entrega")
    expect(message).to_have_attribute("data-status", "READ")
    statuses = page_statuses(page, conversation_id)
    assert [(s["status"], s["seq"]) for s in statuses] == [
        ("SENT", 1),
        ("DELIVERED", 2),
        ("READ", 3),
    ]
    assert {s["message_id"] for s in statuses} == {message.get_attribute("data-message-id")}

    # The log shows both directions, as highlighted JSON with the markup escaped.
    log = page.get_by_test_id("event-log")
    expect(log.locator('[data-kind="out"]').first).to_contain_text('"type": "subscribe"')
    expect(log.locator('[data-kind="in"]').first).to_contain_text('"status": "READ"')
    expect(log.locator(".j-key").first).to_be_visible()
    expect(log.locator(".j-num").first).to_be_visible()

    # The simulator's controls: disorder on and off, then a failure with its reason.
    simulator = f"{embedded_server.url}/simulator/control"
    with page.expect_response(lambda r: r.url == simulator and r.request.method == "POST"):
        page.get_by_test_id("disorder").check()
    assert httpx.get(simulator).json()["disorder"] is True
    with page.expect_response(lambda r: r.url == simulator and r.request.method == "POST"):
        page.get_by_test_id("disorder").uncheck()
    assert httpx.get(simulator).json()["disorder"] is False
    with page.expect_response(lambda r: r.url == simulator and r.request.method == "POST"):
        page.get_by_test_id("failure-rate").fill("100")
    try:
        failed = send(page, "Este número não existe <b>não</b>")
        expect(failed).to_have_attribute("data-status", "FAILED")
        expect(failed.get_by_test_id("message-error")).to_contain_text("Not delivered: ")
        expect(failed).to_contain_text("<b>não</b>")  # text, never markup
        with page.expect_response(lambda r: r.url == simulator and r.request.method == "POST"):
            page.get_by_test_id("failure-rate").fill("0")
    finally:
        httpx.post(simulator, json={"failure_rate": 0})
    send(page, "Qualquer dúvida, é só responder aqui.")
    expect(page.get_by_test_id("message").last).to_have_attribute("data-status", "READ")
    expect(message).to_have_attribute("data-status", "READ")

    assert_no_horizontal_overflow(page)
    print(f"\nscreenshot: {screenshot(page, 'demo-desktop')}")


def test_the_customers_reply_shows_live_and_is_read_when_shown(
    embedded_server: Server, new_page: NewPage
) -> None:
    page = new_page(1280, 800)
    page.goto(printed_demo_url(embedded_server))
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    conversation_id = start_chat(page, "whatsapp", "5511977776666")
    ours = send(page, "Seu pedido saiu para entrega")
    expect(ours).to_have_attribute("data-status", "READ")

    reply_url = f"{embedded_server.url}/simulator/reply"
    with page.expect_response(lambda r: r.url == reply_url) as replied:
        page.get_by_test_id("customer-reply").click()
    wamid = replied.value.json()["provider_message_id"]
    theirs = page.locator('[data-testid="message"][data-direction="in"]')
    expect(theirs).to_have_count(1)
    expect(theirs).to_have_text(re.compile(r"Oi! Recebi|Pode entregar|Perfeito"))
    # Shown on the agent's screen: read, and Meta told once (the customer's ticks go blue).
    expect(theirs).to_have_attribute("data-status", "READ")
    deadline = time.monotonic() + 20
    while httpx.get(f"{embedded_server.url}/simulator/receipts").json()["whatsapp"].get(wamid) != 1:
        assert time.monotonic() < deadline, "the read receipt never reached the simulator"
        time.sleep(0.05)
    inbound = page.evaluate("window.demo.inbound")
    assert [(f["conversation_id"], f["seq"]) for f in inbound] == [(conversation_id, 4)]

    # In auto-reply mode the customer answers each message by themself.
    control = f"{embedded_server.url}/simulator/control"
    try:
        with page.expect_response(lambda r: r.url == control and r.request.method == "POST"):
            page.get_by_test_id("auto-reply").check()
        send(page, "Chega amanhã entre 9h e 12h")
        expect(theirs).to_have_count(2)
        expect(theirs.last).to_have_attribute("data-status", "READ")
    finally:
        httpx.post(control, json={"auto_reply": False})
    assert_no_horizontal_overflow(page)
    print(f"\nscreenshot: {screenshot(page, 'demo-two-way')}")


def wait_for_last_seq(split: Split, token: str, conversation_id: str, seq: int) -> None:
    """Poll the server (bounded) until the conversation's history reaches `seq`."""
    deadline = time.monotonic() + 30
    url = f"{split.pipeline.url}/api/conversations/{conversation_id}"
    while time.monotonic() < deadline:
        answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()
        if answer["last_seq"] >= seq:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never reached seq {seq}")


def test_statuses_applied_while_the_page_was_away_are_replayed(
    tmp_path: Path, new_page: NewPage
) -> None:
    """Deterministic recovery: the page stays offline until the restarted pipeline has
    applied DELIVERED and READ, so both must come back through `subscribe … since`."""
    with split_deployment(tmp_path, sim_delay_ms=1500) as split:
        token = split.pipeline.token("acme", "ana")
        page = new_page(1280, 860)
        page.goto(f"{split.pipeline.url}/demo#token={token}")
        state = page.get_by_test_id("conn-state")
        expect(state).to_have_text("open")
        conversation_id = start_chat(page, "whatsapp", "5521955554444")
        message = send(page, "Chegou a segunda via do boleto")
        expect(message).to_have_attribute("data-status", "SENT")

        stopped_at = time.time()
        stop_server(split.pipeline)
        expect(state).to_have_text("reconnecting")
        page.context.set_offline(True)
        restart_at = time.time()
        split.restart_pipeline()
        ready_at = time.time()
        wait_for_last_seq(split, token, conversation_id, 3)
        expect(message).to_have_attribute("data-status", "SENT")
        page.context.set_offline(False)
        online_at = time.time()
        expect(state).to_have_text("open", timeout=30_000)
        expect(message).to_have_attribute("data-status", "READ")

        result = recovery_report(page, conversation_id, stopped_at, restart_at, ready_at)
        assert [(s["seq"], s["status"]) for s in result["statuses"]] == [
            (1, "SENT"),
            (2, "DELIVERED"),
            (3, "READ"),
        ]
        assert result["replayed_status_frames"] == 2
        assert result["live_status_frames_after_reconnect"] == 0
        result["reconnect_s_after_online"] = round(
            result["reconnect_s_after_ready"] - (online_at - ready_at), 3
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "browser-replay.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"\nreplay: {result['replayed_status_frames']} status frames replayed; page open"
            f" {result['reconnect_s_after_online']} s after the network came back"
        )


def test_page_recovers_every_status_across_a_pipeline_restart(
    tmp_path: Path, new_page: NewPage
) -> None:
    with split_deployment(tmp_path, sim_delay_ms=1500) as split:
        token = split.pipeline.token("acme", "ana")
        page = new_page(1280, 860)
        page.goto(f"{split.pipeline.url}/demo#token={token}")
        state = page.get_by_test_id("conn-state")
        expect(state).to_have_text("open")
        expect(page.get_by_test_id("disorder")).to_be_hidden()  # no simulator in this process

        conversation_id = start_chat(page, "whatsapp", "5521977776666")
        message = send(page, "Sua consulta está confirmada para amanhã às 9h")
        expect(message).to_have_attribute("data-status", "SENT")
        # DELIVERED and READ are 1.5 s and 3 s away: stop the pipeline now.
        stopped_at = time.time()
        stop_server(split.pipeline)
        expect(state).to_have_text("reconnecting")
        seen_before = page_statuses(page, conversation_id)
        assert [s["status"] for s in seen_before][:1] == ["SENT"]
        assert "READ" not in [s["status"] for s in seen_before]

        restart_at = time.time()
        split.restart_pipeline()
        ready_at = time.time()
        expect(state).to_have_text("open", timeout=30_000)
        expect(message).to_have_attribute("data-status", "READ", timeout=30_000)

        result = recovery_report(page, conversation_id, stopped_at, restart_at, ready_at)
        statuses = result["statuses"]
        # Every seq exactly once, in order, and the same as the server's history.
        assert [s["seq"] for s in statuses] == list(range(1, len(statuses) + 1))
        history = httpx.get(
            f"{split.pipeline.url}/api/conversations/{conversation_id}/changes",
            params={"since": 0},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert history["complete"] is True
        assert [(f["message_id"], f["status"], f["seq"]) for f in history["frames"]] == [
            (s["message_id"], s["status"], s["seq"]) for s in statuses
        ]
        assert [s["status"] for s in statuses] == ["SENT", "DELIVERED", "READ"]
        assert result["replayed_status_frames"] + result["live_status_frames_after_reconnect"]
        expect(state).to_have_text("open")
        expect(page.get_by_test_id("conversation")).to_have_attribute("data-sub", "live")

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "browser-reconnect.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"\nreconnect: page open {result['reconnect_s_after_ready']} s after the pipeline"
            f" was ready ({result['reconnect_s_after_restart_began']} s after the restart"
            f" began); {result['replayed_status_frames']} status frames replayed, "
            f"{result['live_status_frames_after_reconnect']} live after the reconnect"
        )
        print(f"screenshot: {screenshot(page, 'demo-reconnected')}")


def test_phone_width_layout_fits_and_ticks_reach_read(
    embedded_server: Server, new_page: NewPage
) -> None:
    page = new_page(390, 844)
    page.goto(f"{embedded_server.url}/demo#token={embedded_server.token('demo', 'demo-agent')}")
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    assert_no_horizontal_overflow(page)

    start_chat(page, "instagram", "17841400000000001")
    start_chat(page, "whatsapp", "5531966665555")
    first = send(page, "Oi! Seu cartão chega amanhã entre 8h e 12h. Qualquer coisa, me chame.")
    expect(first).to_have_attribute("data-status", "READ")
    second = send(page, "Obrigado por comprar com a gente!")
    expect(second).to_have_attribute("data-status", "READ")

    assert_no_horizontal_overflow(page)
    print(f"\nscreenshot: {screenshot(page, 'demo-phone')}")


def tiny_png() -> bytes:
    """A real 2x2 PNG (the browser must draw it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00\x00\xff\x00" * 2)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_an_attached_image_shows_inline_in_its_bubble(
    embedded_server: Server, new_page: NewPage
) -> None:
    page = new_page(1440, 900)
    page.goto(printed_demo_url(embedded_server))
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    start_chat(page, "whatsapp", "5511988877600")
    messages = page.get_by_test_id("message")
    page.get_by_test_id("composer-text").fill("Seu recibo")
    photo: FilePayload = {"name": "recibo.png", "mimeType": "image/png", "buffer": tiny_png()}
    page.get_by_test_id("attach").set_input_files(files=[photo])
    expect(messages).to_have_count(1)
    message = messages.last
    expect(message).to_contain_text("Seu recibo")
    image = message.get_by_test_id("message-image")
    expect(image).to_be_visible()
    # Drawn: the signed URL served the bytes (a broken image has no natural width).
    page.wait_for_function(
        "img => img.complete && img.naturalWidth === 2", arg=image.element_handle()
    )
    # The simulator fetched the link and accepted the send: the ticks move on.
    expect(message).to_have_attribute("data-status", "READ")
    screenshot(page, "demo-media")


def test_a_template_is_sent_from_the_composer_and_shown_by_its_name(
    embedded_server: Server, new_page: NewPage
) -> None:
    page = new_page(1440, 900)
    page.goto(printed_demo_url(embedded_server))
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    start_chat(page, "whatsapp", "5511988877601")
    page.get_by_test_id("send-template").click()
    message = page.get_by_test_id("message").last
    expect(message).to_contain_text("Template hello_world (en_US)")
    # The simulator knows hello_world: it goes on to READ.
    expect(message).to_have_attribute("data-status", "READ")
    screenshot(page, "demo-template")


def test_a_campaigns_funnel_moves_live_to_its_final_counts(
    embedded_server: Server, new_page: NewPage
) -> None:
    """The campaign panel: N simulated contacts, the funnel moving over the WebSocket (only
    ever to newer counts) until every message is READ, the same counts as the API's."""
    simulator = f"{embedded_server.url}/simulator/control"
    httpx.post(simulator, json={"failure_rate": 0, "disorder": False})
    page = new_page(1440, 900)
    page.goto(printed_demo_url(embedded_server))
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    page.get_by_test_id("campaign-size").fill("40")
    with page.expect_response(
        lambda r: r.url.endswith("/api/campaigns") and r.request.method == "POST"
    ) as created:
        page.get_by_test_id("start-campaign").click()
    campaign_id = created.value.json()["id"]

    panel = page.get_by_test_id("campaign")
    expect(page.get_by_test_id("funnel-read")).to_have_text("40")
    expect(panel).to_have_attribute("data-finished", "true")
    for bucket in ("waiting", "queued", "sent", "delivered", "failed"):
        expect(page.get_by_test_id(f"funnel-{bucket}")).to_have_text("0")
    # The page's counts are the campaign's, as the API tells them.
    token = httpx.post(f"{embedded_server.url}/demo/token").json()["token"]
    answer = httpx.get(
        f"{embedded_server.url}/api/campaigns/{campaign_id}",
        headers={"Authorization": f"Bearer {token}"},
    )
    counts = answer.json()["counts"]
    shown = {
        bucket: int(page.get_by_test_id(f"funnel-{bucket}").inner_text())
        for bucket in ("waiting", "queued", "sent", "delivered", "read", "failed")
    }
    assert shown == {k: v for k, v in counts.items() if k != "failed_by_code"}
    # It moved there live: a snapshot short of the end, then newer counts only.
    frames: list[dict[str, Any]] = page.evaluate("window.demo.campaigns")
    assert len(frames) >= 2 and frames[0]["counts"]["read"] < 40, frames[0]
    versions = [frame["version"] for frame in frames]
    assert versions == sorted(set(versions)), versions
    assert_no_horizontal_overflow(page)
    print(f"\nscreenshot: {screenshot(page, 'demo-campaign')}")


def test_a_customers_image_shows_inline_in_their_bubble(
    embedded_server: Server, new_page: NewPage
) -> None:
    """The customer sends a photo (through the simulator, as Meta would: a Graph media
    id): fetched into the media store, then announced, it shows inline in a customer's
    bubble with its caption, and is read once shown."""
    page = new_page(1440, 900)
    page.goto(printed_demo_url(embedded_server))
    expect(page.get_by_test_id("conn-state")).to_have_text("open")
    start_chat(page, "whatsapp", "5511988877602")
    held = httpx.post(
        f"{embedded_server.url}/simulator/media",
        content=tiny_png(),
        headers={"Content-Type": "image/png"},
    )
    reply = {
        "channel": "whatsapp",
        "contact": "5511988877602",
        "media_id": held.json()["id"],
        "text": "Meu recibo",
    }
    assert httpx.post(f"{embedded_server.url}/simulator/reply", json=reply).status_code == 202
    theirs = page.locator('[data-testid="message"][data-direction="in"]')
    expect(theirs).to_have_count(1)
    expect(theirs).to_contain_text("Meu recibo")
    image = theirs.get_by_test_id("message-image")
    expect(image).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth === 2", arg=image.element_handle()
    )
    expect(theirs).to_have_attribute("data-status", "READ")
    # Read over the socket: one `read` frame, answered `read_ok`.
    expect(page.locator(".entry-label", has_text=re.compile(r"^sent read$"))).to_have_count(1)
    expect(page.locator(".entry-label", has_text=re.compile(r"^received read_ok$"))).to_have_count(
        1
    )
    screenshot(page, "demo-inbound-media")
