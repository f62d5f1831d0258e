"""Pure builders and checks of the payloads the simulator exchanges, in Meta's shapes
(see shared/fixtures/meta): send answers, errors, status and seen webhooks, fresh ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
from collections.abc import Sequence
from typing import Any

#: Made-up account data the simulator reports about "its" WhatsApp Business Account.
WABA_ID = "880011223344556"
DISPLAY_PHONE_NUMBER = "5511999990000"

#: Meta's limits on a text message body.
WHATSAPP_TEXT_LIMIT = 4096
INSTAGRAM_TEXT_LIMIT = 1000
CALLBACK_DATA_LIMIT = 512
#: Meta: a medium's caption (image, document, video) is at most 1,024 characters.
MEDIA_CAPTION_LIMIT = 1024
#: The send types that carry a medium, by link or by an uploaded media id.
MEDIA_KINDS = ("image", "document", "audio", "video")

UNDELIVERABLE = {
    "code": 131026,
    "title": "Message undeliverable",
    "message": "Message undeliverable",
    "error_data": {"details": "Message Undeliverable."},
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}

#: A free-form message outside the customer service window (a `failed` status, as Meta).
REENGAGEMENT = {
    "code": 131047,
    "title": "Re-engagement message",
    "message": "Re-engagement message",
    "error_data": {
        "details": "Message failed to send because more than 24 hours have passed since the"
        " customer last replied to this number."
    },
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}
#: Instagram's message tags (the Send API's `tag` with `messaging_type` `MESSAGE_TAG`).
INSTAGRAM_TAGS = ("HUMAN_AGENT",)
INSTAGRAM_MESSAGING_TYPES = ("RESPONSE", "UPDATE", "MESSAGE_TAG")

_TRACE_ALPHABET = string.ascii_letters + string.digits + "_-"


# Ids come from the OS, not the seeded generator: a restarted simulator with the same seed
# must not hand out provider ids that a persistent store already knows.
def new_wamid() -> str:
    return "wamid." + base64.b64encode(secrets.token_bytes(30)).decode()


def new_instagram_mid() -> str:
    return base64.b64encode(secrets.token_bytes(48)).decode()


def new_fbtrace_id() -> str:
    return "".join(secrets.choice(_TRACE_ALPHABET) for _ in range(11))


def meta_error(
    code: int,
    message: str,
    *,
    error_type: str = "OAuthException",
    subcode: int | None = None,
    transient: bool | None = None,
) -> dict[str, Any]:
    """Graph API's error answer; `message` carries the `(#code)` prefix as Meta's does."""
    error: dict[str, Any] = {"message": message, "type": error_type, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    if transient is not None:
        error["is_transient"] = transient
    error["fbtrace_id"] = new_fbtrace_id()
    return {"error": error}


def whatsapp_send_answer(to: str, wamid: str) -> dict[str, Any]:
    wa_id = "".join(ch for ch in to if ch.isdigit())
    return {
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": wa_id}],
        "messages": [{"id": wamid, "message_status": "accepted"}],
    }


def instagram_send_answer(recipient_id: str, message_id: str) -> dict[str, Any]:
    return {"recipient_id": recipient_id, "message_id": message_id}


def whatsapp_send_key(to: str, text: str, callback_data: str) -> str:
    """What the simulator counts a WhatsApp send under: our message id, which the connector
    sends as `biz_opaque_callback_data`; the recipient and text when there is none."""
    if callback_data:
        return f"whatsapp:{callback_data}"
    wa_id = "".join(ch for ch in to if ch.isdigit())
    return f"whatsapp-to:{wa_id}:{text}"


def instagram_send_key(recipient_id: str, text: str) -> str:
    """What the simulator counts an Instagram send under: Instagram's send carries no
    data of ours, so the recipient and the text."""
    return f"instagram:{recipient_id}:{text}"


def whatsapp_send_problem(body: Any) -> str | None:
    """Why Meta would refuse this send request (a `(#100)` message), or None."""
    if not isinstance(body, dict):
        return "(#100) The request body must be a JSON object"
    if body.get("messaging_product") != "whatsapp":
        return "(#100) The parameter messaging_product is required."
    to = body.get("to")
    if not isinstance(to, str) or not any(ch.isdigit() for ch in to):
        return "(#100) The parameter to is required."
    kind = body.get("type", "text")
    if kind in MEDIA_KINDS:
        problem = _media_problem(kind, body.get(kind))
        if problem is not None:
            return problem
    elif kind == "template":
        problem = _template_problem(body.get("template"))
        if problem is not None:
            return problem
    elif kind != "text":
        return (
            "(#100) Param type must be one of {TEXT, IMAGE, DOCUMENT, AUDIO, VIDEO, TEMPLATE} here"
        )
    else:
        problem = _text_problem(body.get("text"))
        if problem is not None:
            return problem
    callback = body.get("biz_opaque_callback_data", "")
    if not isinstance(callback, str) or len(callback) > CALLBACK_DATA_LIMIT:
        return (
            "(#100) Param biz_opaque_callback_data must be a string of at most"
            f" {CALLBACK_DATA_LIMIT} characters."
        )
    return None


def _media_problem(kind: str, media: Any) -> str | None:
    """A media send's object (`{"link"|"id", "caption"?, "filename"?}`): why Meta would
    refuse it, or None."""
    if not isinstance(media, dict):
        return f"(#100) The parameter {kind} is required."
    link, held = media.get("link"), media.get("id")
    if not (isinstance(link, str) and link.startswith(("http://", "https://"))) and not (
        isinstance(held, str) and held
    ):
        return f"(#100) Param {kind} must have a link (http or https) or an id."
    caption = media.get("caption", "")
    if kind == "audio" and caption:
        return "(#100) Param audio['caption'] is not allowed."
    if not isinstance(caption, str) or len(caption) > MEDIA_CAPTION_LIMIT:
        return f"(#100) Param {kind}['caption'] must be at most {MEDIA_CAPTION_LIMIT} characters."
    if not isinstance(media.get("filename", ""), str):
        return f"(#100) Param {kind}['filename'] must be a string."
    return None


def _template_problem(template: Any) -> str | None:
    """A template send's object (`{"name", "language": {"code"}, "components"?}`): why
    Meta would refuse its shape, or None (whether it knows the template is 132001's)."""
    if not isinstance(template, dict) or not isinstance(template.get("name"), str):
        return "(#100) The parameter template['name'] is required."
    language = template.get("language")
    if not isinstance(language, dict) or not isinstance(language.get("code"), str):
        return "(#100) The parameter template['language']['code'] is required."
    components = template.get("components", [])
    if not isinstance(components, list) or not all(
        isinstance(c, dict) and isinstance(c.get("parameters"), list) for c in components
    ):
        return "(#100) Param template['components'] must be a list of components."
    return None


def template_of(body: dict[str, Any]) -> tuple[str, str]:
    """(name, language code) of a valid template send."""
    template = body["template"]
    return str(template["name"]), str(template["language"]["code"])


def _text_problem(text: Any) -> str | None:
    text_body = text.get("body") if isinstance(text, dict) else None
    if not isinstance(text_body, str) or not text_body.strip():
        return "(#100) The parameter text['body'] is required."
    if len(text_body) > WHATSAPP_TEXT_LIMIT:
        return f"(#100) Param text['body'] must be at most {WHATSAPP_TEXT_LIMIT} characters long."
    return None


def whatsapp_send_content(body: dict[str, Any]) -> str:
    """What a valid send says, for its key: the text, or the medium's caption or link."""
    kind = body.get("type", "text")
    if kind == "text":
        return str(body["text"]["body"])
    if kind == "template":
        return "template:" + json.dumps(body["template"], sort_keys=True)
    media = body[kind]
    return str(media.get("caption") or media.get("link") or media.get("id"))


def instagram_send_problem(body: Any) -> str | None:
    """Why Meta would refuse this Instagram send request, or None."""
    if not isinstance(body, dict):
        return "(#100) The request body must be a JSON object"
    recipient = body.get("recipient")
    recipient_id = recipient.get("id") if isinstance(recipient, dict) else None
    if not isinstance(recipient_id, str) or not recipient_id:
        return "(#100) The parameter recipient is required"
    message = body.get("message")
    if isinstance(message, dict) and "attachment" in message:
        return _attachment_problem(message)
    text = message.get("text") if isinstance(message, dict) else None
    if not isinstance(text, str) or not text.strip():
        return "(#100) The parameter message['text'] is required"
    if len(text) > INSTAGRAM_TEXT_LIMIT:
        return (
            "(#100) Length of param message[text] must be less than or equal to"
            f" {INSTAGRAM_TEXT_LIMIT}"
        )
    messaging_type, tag = body.get("messaging_type", "RESPONSE"), body.get("tag")
    if messaging_type not in INSTAGRAM_MESSAGING_TYPES:
        return "(#100) Param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}"
    if (messaging_type == "MESSAGE_TAG") != (tag is not None) or (
        tag is not None and tag not in INSTAGRAM_TAGS
    ):
        return "(#100) Param tag must be HUMAN_AGENT, with messaging_type MESSAGE_TAG only"
    return None


#: Instagram's attachment types a send may carry by URL.
INSTAGRAM_ATTACHMENT_TYPES = ("image", "video", "audio", "file")


def _attachment_problem(message: dict[str, Any]) -> str | None:
    """An Instagram send of `message.attachment` (`{"type","payload":{"url"}}`, no text
    beside it): why Meta would refuse it, or None."""
    if "text" in message:
        return "(#100) Only one of message['text'] and message['attachment'] may be set"
    attachment = message["attachment"]
    kind = attachment.get("type") if isinstance(attachment, dict) else None
    if kind not in INSTAGRAM_ATTACHMENT_TYPES:
        return "(#100) Param message[attachment][type] must be one of image, video, audio, file"
    payload = attachment.get("payload")
    url = payload.get("url") if isinstance(payload, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return "(#100) Param message[attachment][payload][url] must be a URL"
    return None


def instagram_send_content(message: dict[str, Any]) -> str:
    """What a valid Instagram send says, for its key: the text, or the attachment's URL."""
    if "attachment" in message:
        return str(message["attachment"]["payload"]["url"])
    return str(message["text"])


def whatsapp_status(
    wamid: str,
    status: str,
    timestamp: int,
    recipient_id: str,
    callback_data: str | None,
    *,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `statuses[]` item. Like Meta: conversation and pricing on sent and delivered,
    `errors[]` on failed (`error`, else undeliverable), callback data echoed when the
    send carried it."""
    item: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": recipient_id,
    }
    if callback_data:
        item["biz_opaque_callback_data"] = callback_data
    if status in ("sent", "delivered"):
        conversation: dict[str, Any] = {"id": _conversation_id(recipient_id)}
        if status == "sent":
            conversation["expiration_timestamp"] = str(timestamp + 24 * 3600)
        conversation["origin"] = {"type": "service"}
        item["conversation"] = conversation
        item["pricing"] = {
            "billable": False,
            "pricing_model": "PMP",
            "type": "free_customer_service",
            "category": "service",
        }
    if status == "failed":
        item["errors"] = [dict(error or UNDELIVERABLE)]
    return item


def _conversation_id(recipient_id: str) -> str:
    return hashlib.sha256(recipient_id.encode()).hexdigest()[:32]


def whatsapp_message(from_: str, wamid: str, timestamp: int, text: str) -> dict[str, Any]:
    """One `messages[]` item: the customer `from_` wrote `text`."""
    return {
        "from": from_,
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "text",
        "text": {"body": text},
    }


def whatsapp_media_message(
    from_: str, wamid: str, timestamp: int, kind: str, media: dict[str, Any]
) -> dict[str, Any]:
    """One `messages[]` item: the customer `from_` sent a medium of `kind` (`media`:
    Meta's `id`, `mime_type`, `sha256`, and a `caption` or a document's `filename`)."""
    return {"from": from_, "id": wamid, "timestamp": str(timestamp), "type": kind, kind: media}


def whatsapp_message_webhook(
    phone_number_id: str, from_: str, messages: list[dict[str, Any]]
) -> dict[str, Any]:
    """Customers' messages as Meta sends them: with the sender's profile in `contacts`."""
    webhook = whatsapp_status_webhook(phone_number_id, [])
    value = webhook["entry"][0]["changes"][0]["value"]
    del value["statuses"]
    value["contacts"] = [{"profile": {"name": "Simulated customer"}, "wa_id": from_}]
    value["messages"] = messages
    return webhook


def whatsapp_status_webhook(phone_number_id: str, statuses: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": WABA_ID,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": DISPLAY_PHONE_NUMBER,
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": statuses,
                        },
                    }
                ],
            }
        ],
    }


def instagram_seen(
    account_id: str, reader_id: str, message_id: str, timestamp_ms: int
) -> dict[str, Any]:
    """One `messaging[]` item: `reader_id` saw `message_id` (and all before it)."""
    return {
        "sender": {"id": reader_id},
        "recipient": {"id": account_id},
        "timestamp": timestamp_ms,
        "read": {"mid": message_id},
    }


def instagram_message(
    account_id: str, sender_id: str, mid: str, text: str, timestamp_ms: int
) -> dict[str, Any]:
    """One `messaging[]` item: the customer `sender_id` wrote `text`."""
    return {
        "sender": {"id": sender_id},
        "recipient": {"id": account_id},
        "timestamp": timestamp_ms,
        "message": {"mid": mid, "text": text},
    }


def instagram_attachment_message(
    account_id: str, sender_id: str, mid: str, attachment: tuple[str, str], timestamp_ms: int
) -> dict[str, Any]:
    """One `messaging[]` item: the customer `sender_id` sent an attachment (`image`,
    `video`, `audio` or `file`) as `(type, url)`, its bytes at the URL (Meta's CDN, no
    token)."""
    kind, url = attachment
    return {
        "sender": {"id": sender_id},
        "recipient": {"id": account_id},
        "timestamp": timestamp_ms,
        "message": {"mid": mid, "attachments": [{"type": kind, "payload": {"url": url}}]},
    }


def instagram_webhook(
    account_id: str, messaging: list[dict[str, Any]], time_ms: int
) -> dict[str, Any]:
    return {
        "object": "instagram",
        "entry": [{"id": account_id, "time": time_ms, "messaging": messaging}],
    }


def merge_webhooks(bodies: Sequence[bytes]) -> bytes:
    """Several webhook bodies of one object (channel) as one, their entries in order, as
    Meta batches the notifications that are due together."""
    merged: dict[str, Any] | None = None
    for body in bodies:
        payload = json.loads(body)
        if merged is None:
            merged = {"object": payload["object"], "entry": list(payload["entry"])}
        elif payload["object"] != merged["object"]:
            raise ValueError("webhooks of different objects cannot be merged")
        else:
            merged["entry"].extend(payload["entry"])
    if merged is None:
        raise ValueError("no webhook to merge")
    return json.dumps(merged, separators=(",", ":")).encode()
