#!/usr/bin/env bash
# Prometheus from Debian's packages, for the test that scrapes a running `whatslike serve`
# (the test starts its own server on a free port with its own configuration; nothing runs
# here). Writes .services/prometheus.env.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

case "${1:-start}" in
  stop) echo "services: prometheus has no server here to stop"; exit ;;
  status)
    bin=$(env_value .services/prometheus.env WHATSLIKE_TEST_PROMETHEUS_BIN)
    if [ -n "$bin" ] && [ -x "$bin" ]; then
      echo "prometheus: installed ($bin); no server runs here, the tests start their own"
    else
      echo "prometheus: not set up here (scripts/services.sh prometheus)"
      exit 3
    fi
    exit ;;
esac

apt_install prometheus
# Debian's package would start a system-wide server where it can; the tests don't use it.
echo "WHATSLIKE_TEST_PROMETHEUS_BIN=$(command -v prometheus)" > .services/prometheus.env
echo "services: $(prometheus --version 2>&1 | head -n 1)"
