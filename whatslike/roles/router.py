"""The router role: moves each accepted message from `messages` to its channel's topic.

The event is forwarded byte for byte (after checking it decodes), keyed by conversation.
"""

from __future__ import annotations

from whatslike.events import TOPIC_MESSAGES, OutboundMessage, outbound_topic
from whatslike.roles import Deps, RoleDefaults


class Router(RoleDefaults):
    name = "router"

    def __init__(self, deps: Deps) -> None:
        self._bus = deps.bus
        deps.bus.subscribe(TOPIC_MESSAGES, "router", self.route)

    async def route(self, raw: bytes) -> None:
        message = OutboundMessage.from_json(raw)
        await self._bus.publish(outbound_topic(message.channel), message.conversation_id, raw)
