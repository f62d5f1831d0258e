"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bus_published = Counter(
            "whatslike_bus_published_total", "Events published", ["topic"], registry=r
        )
        self.bus_handled = Counter(
            "whatslike_bus_handled_total", "Events handled", ["topic", "group"], registry=r
        )
        self.bus_retries = Counter(
            "whatslike_bus_retries_total",
            "Handler failures retried",
            ["topic", "group"],
            registry=r,
        )
        self.bus_dead_letters = Counter(
            "whatslike_bus_dead_letters_total",
            "Events sent to a DLQ",
            ["topic", "group"],
            registry=r,
        )
        self.bus_queue_depth = Gauge(
            "whatslike_bus_queue_depth", "Events waiting", ["topic", "group"], registry=r
        )
        self.bus_consumer_lag = Gauge(
            "whatslike_bus_consumer_lag",
            "Records of a partition not yet handled by this consumer (high watermark minus"
            " the next record to handle), refreshed at each fetch",
            ["topic", "group", "partition"],
            registry=r,
        )
        self.status_applied = Counter(
            "whatslike_status_applied_total", "apply_status outcomes", ["effect"], registry=r
        )
        self.status_anomalies = Counter(
            "whatslike_status_anomalies_total",
            "FAILED after delivery, recorded not applied",
            registry=r,
        )
        self.status_consumed = Counter(
            "whatslike_status_consumed_total", "Status events taken from the bus", registry=r
        )
        self.status_duplicates = Counter(
            "whatslike_status_duplicates_total",
            "Status events applied before (a redelivery): their frames published again",
            registry=r,
        )
        self.status_bus_lag = Histogram(
            "whatslike_status_bus_lag_seconds",
            "From our receipt of a status to the status worker taking it from the bus",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
            registry=r,
        )
        self.status_batch_size = Histogram(
            "whatslike_status_batch_size",
            "Statuses applied per store transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.store_seconds = Histogram(
            "whatslike_store_seconds",
            "Store call latency on the ingest path, by operation",
            ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.status_latency = Histogram(
            "whatslike_status_fanout_seconds",
            "From our receipt of the provider's news to the fan-out publish",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.provider_lag = Histogram(
            "whatslike_status_provider_lag_seconds",
            "From the provider's own time of a status (whole seconds on WhatsApp) to its"
            " fan-out publish",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.ws_connections = Gauge(
            "whatslike_ws_connections", "Open WebSocket connections", registry=r
        )
        self.ws_subscriptions = Gauge(
            "whatslike_ws_subscriptions",
            "Conversations followed by open WebSocket connections (one per connection each)",
            registry=r,
        )
        self.ws_frames_sent = Counter(
            "whatslike_ws_frames_sent_total", "Frames written to sockets", registry=r
        )
        self.ws_closes = Counter(
            "whatslike_ws_closes_total", "Server-initiated closes", ["code"], registry=r
        )
        self.ws_bad_frames = Counter(
            "whatslike_ws_bad_frames_total",
            "Client frames answered with error",
            ["code"],
            registry=r,
        )
        self.webhooks = Counter(
            "whatslike_webhooks_total", "Provider webhooks", ["channel", "outcome"], registry=r
        )
        self.receipts = Counter(
            "whatslike_read_receipts_total",
            "Read receipts of customers' messages sent to Meta, by outcome",
            ["channel", "outcome"],
            registry=r,
        )
        self.inbound_messages = Counter(
            "whatslike_inbound_messages_total",
            "Customers' messages stored (a redelivered one counts again)",
            ["channel"],
            registry=r,
        )
        self.inbound_media = Counter(
            "whatslike_inbound_media_total",
            "Customers' media fetched from Meta, by outcome (stored, retry, failed)",
            ["channel", "outcome"],
            registry=r,
        )
        self.webhook_items_skipped = Counter(
            "whatslike_webhook_items_skipped_total",
            "Items of accepted webhooks not applied (malformed, provider_error, ignored)",
            ["channel", "reason"],
            registry=r,
        )
        self.sends = Counter(
            "whatslike_provider_sends_total",
            "Provider send calls",
            ["channel", "outcome"],
            registry=r,
        )
        self.outbox_relayed = Counter(
            "whatslike_outbox_relayed_total", "Outbox hand-offs handed to the bus", registry=r
        )
        self.stuck_messages = Gauge(
            "whatslike_stuck_messages",
            "Messages that have not moved for a while, by kind (pending, unknown, sent)",
            ["kind"],
            registry=r,
        )
        for kind in ("pending", "unknown", "sent"):
            self.stuck_messages.labels(kind)  # 0 until the first sweep, not absent
        self.redriven = Counter(
            "whatslike_redriven_total", "PENDING messages handed off again", registry=r
        )
        self.dead_letters_unapplied = Gauge(
            "whatslike_dead_letters_unapplied",
            "Dead-lettered statuses that would still change their message (whatslike dlq list)",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "whatslike_webhook_deliveries_total",
            "Outbound webhook attempts by outcome: delivered (2xx), retried (a failed attempt"
            " to try again), parked (given up after the retry period)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "retried", "parked"):
            self.webhook_deliveries.labels(outcome)  # 0 from the start, not absent
        self.webhook_oldest_pending = Gauge(
            "whatslike_webhook_oldest_pending_seconds",
            "Age of the oldest outbound webhook delivery neither delivered nor parked (0: none;"
            " every sender reports the same store-wide value)",
            registry=r,
        )
        self.parked_statuses = Counter(
            "whatslike_parked_statuses_total",
            "Statuses that arrived before their send answer",
            ["channel"],
            registry=r,
        )
