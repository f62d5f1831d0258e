#!/usr/bin/env bash
# Prometheus from Debian's packages, for the test that scrapes a running `whatslike serve`
# (the test starts its own server on a free port with its own configuration; nothing runs
# here). Writes .services/prometheus.env.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

apt_install prometheus
# Debian's package would start a system-wide server where it can; the tests don't use it.
echo "WHATSLIKE_TEST_PROMETHEUS_BIN=$(command -v prometheus)" > .services/prometheus.env
echo "services: $(prometheus --version 2>&1 | head -n 1)"
