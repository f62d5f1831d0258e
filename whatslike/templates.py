"""WhatsApp message templates: what the API takes, what is stored, what Meta is sent.

A template is Meta's template object (WhatsApp Cloud API, `"type": "template"`): a name,
a language, and the components whose parameters fill its variables. The API validates it
with `Template` (every bound is in its JSON Schema, so the contract says exactly what is
taken); it is stored and carried on the bus as its canonical JSON text (`canonical`), and
the connector sends `meta_template` of it. Whether Meta approved that name in that
language is Meta's to say (132001): no API can know it.

Parameters are text (a header's, the body's, a URL button's suffix) or a quick-reply
button's payload; media headers, currency and date_time parameters are not offered yet.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

#: Meta: a template's name is lowercase letters, digits and underscores, at most 512.
TEMPLATE_NAME = r"^[a-z0-9_]{1,512}$"
#: Meta's language codes: a language (`en`, `fil`), maybe with a region (`pt_BR`).
LANGUAGE_CODE = r"^[a-z]{2,3}(_[A-Z]{2})?$"
#: No control character (Meta refuses new lines and tabs in a parameter: 132018).
_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
#: A body's variables at most (Meta's limit on a body is its 1,024 characters, text and
#: variables together; 20 variables is more than any template needs).
MAX_BODY_PARAMETERS = 20
#: A body's text is at most 1,024 characters, so a variable's is too.
BODY_PARAMETER_CHARS = 1024
#: A text header has at most one variable, and 60 characters.
HEADER_PARAMETER_CHARS = 60
#: Meta: up to 10 buttons (index 0 to 9).
MAX_BUTTONS = 10
#: A quick-reply button's payload, and a URL button's variable suffix, at most.
PAYLOAD_CHARS = 128
URL_SUFFIX_CHARS = 2000


BodyValue = Annotated[
    str, Field(min_length=1, max_length=BODY_PARAMETER_CHARS, pattern=_NO_CONTROL)
]
HeaderValue = Annotated[
    str, Field(min_length=1, max_length=HEADER_PARAMETER_CHARS, pattern=_NO_CONTROL)
]
UrlSuffixValue = Annotated[
    str, Field(min_length=1, max_length=URL_SUFFIX_CHARS, pattern=_NO_CONTROL)
]
PayloadValue = Annotated[str, Field(min_length=1, max_length=PAYLOAD_CHARS, pattern=_NO_CONTROL)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Language(_Closed):
    code: Annotated[str, Field(pattern=LANGUAGE_CODE, description="`en`, `en_US`, `pt_BR`…")]
    policy: Literal["deterministic"] = "deterministic"


class BodyText(_Closed):
    type: Literal["text"]
    text: BodyValue


class HeaderText(_Closed):
    type: Literal["text"]
    text: HeaderValue


class UrlSuffix(_Closed):
    type: Literal["text"]
    text: UrlSuffixValue


class Payload(_Closed):
    type: Literal["payload"]
    payload: PayloadValue


class Header(_Closed):
    """A text header's variable."""

    type: Literal["header"]
    parameters: Annotated[list[HeaderText], Field(min_length=1, max_length=1)]


class Body(_Closed):
    """The body's variables, in order ({{1}}, {{2}}, …)."""

    type: Literal["body"]
    parameters: Annotated[list[BodyText], Field(min_length=1, max_length=MAX_BODY_PARAMETERS)]


ButtonIndex = Annotated[int, Field(ge=0, le=MAX_BUTTONS - 1, description="The button's place.")]


class QuickReply(_Closed):
    """The payload a quick-reply button sends back when tapped."""

    type: Literal["button"]
    sub_type: Literal["quick_reply"]
    index: ButtonIndex
    parameters: Annotated[list[Payload], Field(min_length=1, max_length=1)]


class UrlButton(_Closed):
    """The variable end of a URL button's link."""

    type: Literal["button"]
    sub_type: Literal["url"]
    index: ButtonIndex
    parameters: Annotated[list[UrlSuffix], Field(min_length=1, max_length=1)]


def _component_kind(value: Any) -> str | None:
    """Which component a value is: its `type`, and a button's `sub_type` (so an error
    names the component meant, not every one it is not)."""
    if isinstance(value, dict):
        kind, sub_type = value.get("type"), value.get("sub_type")
    else:
        kind, sub_type = getattr(value, "type", None), getattr(value, "sub_type", None)
    if kind == "button":
        return f"button:{sub_type}"
    return kind if isinstance(kind, str) else None


Component = Annotated[
    Annotated[Header, Tag("header")]
    | Annotated[Body, Tag("body")]
    | Annotated[QuickReply, Tag("button:quick_reply")]
    | Annotated[UrlButton, Tag("button:url")],
    Discriminator(
        _component_kind,
        custom_error_type="component",
        custom_error_message="a component is a header, a body, or a button of sub_type "
        "quick_reply or url",
    ),
]


class Template(_Closed):
    """A WhatsApp template message, in Meta's shape: `name`, `language`, and the
    `components` that fill its variables (none for a template without variables)."""

    name: Annotated[str, Field(pattern=TEMPLATE_NAME, description="An approved template.")]
    language: Language
    components: Annotated[
        list[Component],
        Field(
            default_factory=list, max_length=2 + MAX_BUTTONS, description="Header, body, buttons."
        ),
    ]


def canonical(template: Template) -> str:
    """The JSON text stored with the message and carried on the bus (one spelling for
    one template, so a redrive sends the very same)."""
    return json.dumps(
        template.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def meta_template(stored: str) -> dict[str, Any]:
    """Meta's `template` object of a stored template (a button's index as the string
    Meta's reference shows)."""
    data: dict[str, Any] = json.loads(stored)
    components = [
        {**component, "index": str(component["index"])}
        if component["type"] == "button"
        else component
        for component in data.get("components", [])
    ]
    body: dict[str, Any] = {"name": data["name"], "language": data["language"]}
    if components:
        body["components"] = components
    return body
