#!/usr/bin/env bash
# Install (apt, Maven Central) and start the servers the tests talk to, each on a free
# loopback port chosen at its first start, and tell the tests where they are.
#
#   scripts/services.sh                 # every service the test suite needs
#   scripts/services.sh postgres redis  # only these
#   scripts/services.sh status [NAME…]  # one line each: running (pid, address) or stopped
#   scripts/services.sh stop [NAME…]    # stop the servers this checkout started
#   scripts/services.sh cassandra-cluster kafka-cluster  # the clusters of make test-cluster
#                                       # (three nodes each on 127.0.0.2-4; not in ALL)
#
# `stop` acts only on the pid files of this checkout (.services/<name>/): a server another
# checkout started is left alone, even when .services/<name>.env names it. `status` exits 3
# when one of them does not answer.
# Each service has a script in scripts/services/<name>.sh that is idempotent (it reuses a
# server that already answers), prints what it did, and writes the variables the tests
# read (WHATSLIKE_TEST_<NAME>_URL=…) into .services/<name>.env. tests/conftest.py loads
# .services/*.env, so `pytest` alone works once this ran. .services/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(postgres redis kafka prometheus cassandra s3proxy)
action=start
case "${1:-}" in
  start | stop | status) action=$1; shift ;;
esac
wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
  wanted=("${ALL[@]}")
  # The reverse of the start order.
  [ "$action" != stop ] || wanted=(s3proxy cassandra prometheus kafka redis postgres)
fi
mkdir -p .services
for name in "${wanted[@]}"; do
  [ -x "scripts/services/$name.sh" ] || { echo "services: no such service '$name'" >&2; exit 2; }
done
# A start stops at the first failure; stop and status go through every service.
status=0
for name in "${wanted[@]}"; do
  if [ "$action" = start ]; then
    "scripts/services/$name.sh"
  else
    "scripts/services/$name.sh" "$action" || status=$?
  fi
done
exit "$status"
