"""Every role alone in a process on shared backends: `serve` accepts it and the process
runs what that role needs (no server is reached: the runtime is only assembled)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import OWN_SECRETS
from whatslike.api.http import HttpApi
from whatslike.app import Runtime
from whatslike.connectors.whatsapp import WhatsAppConnector
from whatslike.errors import ConfigError
from whatslike.hub.server import Hub
from whatslike.roles.relay import OutboxRelay
from whatslike.roles.router import Router
from whatslike.roles.status_worker import StatusWorker
from whatslike.roles.watchdog import Watchdog
from whatslike.settings import load_settings
from whatslike.simulator.app import Simulator

SHARED = {
    "bus_url": "kafka://127.0.0.1:9",
    "fanout_url": "redis://127.0.0.1:9/0",
    "database_url": "postgresql://whatslike@127.0.0.1:9/whatslike",
    "jwt_secret": "a-shared-secret-of-the-deployment",
    **{name.removeprefix("WHATSLIKE_").lower(): value for name, value in OWN_SECRETS.items()},
}


@pytest.mark.parametrize(
    ("role", "needs", "lacks"),
    [
        ("api", {HttpApi, Hub, OutboxRelay}, {Router, StatusWorker, Watchdog}),
        ("status-worker", {StatusWorker, Watchdog, OutboxRelay}, {Hub, Router}),
        ("router", {Router}, {OutboxRelay, Hub, StatusWorker}),
        ("connector", {WhatsAppConnector, OutboxRelay}, {Hub, Router, StatusWorker}),
        ("simulator", {Simulator}, {OutboxRelay, Hub, Router}),
    ],
)
def test_each_role_alone_runs_what_it_needs(
    tmp_path: Path, role: str, needs: set[type], lacks: set[type]
) -> None:
    runtime = Runtime(load_settings(roles=role, data_dir=tmp_path, **SHARED))
    kinds = {type(running) for running in runtime.roles}
    assert needs <= kinds
    assert not lacks & kinds


def test_a_role_alone_on_the_in_process_bus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in-process bus"):
        Runtime(load_settings(roles="api", data_dir=tmp_path, **{**SHARED, "bus_url": "memory://"}))
