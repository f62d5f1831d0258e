#!/usr/bin/env bash
# Install (apt, Maven Central) and start the servers the tests talk to, each on a free
# loopback port chosen at its first start, and tell the tests where they are.
#
#   scripts/services.sh                 # every service the test suite needs
#   scripts/services.sh postgres redis  # only these
#
# Each service has a script in scripts/services/<name>.sh that is idempotent (it reuses a
# server that already answers), prints what it did, and writes the variables the tests
# read (WHATSLIKE_TEST_<NAME>_URL=…) into .services/<name>.env. tests/conftest.py loads
# .services/*.env, so `pytest` alone works once this ran. .services/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(postgres redis kafka prometheus cassandra)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${ALL[@]}")
mkdir -p .services
for name in "${wanted[@]}"; do
  script="scripts/services/$name.sh"
  [ -x "$script" ] || { echo "services: no such service '$name'" >&2; exit 2; }
  "$script"
done
