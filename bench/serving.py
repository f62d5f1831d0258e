"""A throwaway `whatslike serve` for a benchmark: its own data directory, stopped after."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.conftest import Server, start_server, stop_server

#: Benchmarks measure speed, not the caps: one user holds every socket, one organization
#: sends every message.
UNCAPPED = {
    "WHATSLIKE_MAX_CONNECTIONS_PER_USER": "1000000",
    "WHATSLIKE_MAX_CONNECTIONS_PER_IP": "1000000",
    "WHATSLIKE_MAX_CONNECTIONS": "1000000",
    "WHATSLIKE_ORG_REQUESTS_PER_S": "1000000",
    "WHATSLIKE_ORG_REQUEST_BURST": "1000000",
}


@contextmanager
def temporary_server(env: dict[str, str]) -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as data_dir:
        server = start_server(Path(data_dir), env)
        try:
            yield server
        finally:
            stop_server(server)
