"""Loads where `scripts/services.sh` started the test servers (.services/*.env), so a plain
`pytest` finds them; variables already set in the environment win."""

from __future__ import annotations

import os
from pathlib import Path

SERVICES = Path(__file__).resolve().parent.parent / ".services"

for env_file in sorted(SERVICES.glob("*.env")):
    for line in env_file.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("WHATSLIKE_TEST_"):
            os.environ.setdefault(name, value)
