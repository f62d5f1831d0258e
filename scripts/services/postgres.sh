#!/usr/bin/env bash
# PostgreSQL from Debian's packages, in a cluster of its own ("whatslike") on a free
# loopback port, trusting connections from 127.0.0.1/::1 only (the tests connect as
# postgres without a password). Writes .services/postgres.env.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

CLUSTER=whatslike
apt_install postgresql postgresql-client

version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version $CLUSTER"; then
  port=$(free_port)
  echo "services: creating PostgreSQL $version cluster '$CLUSTER' on 127.0.0.1:$port"
  # Loopback host connections are trusted; local socket connections use peer auth.
  pg_createcluster "$version" "$CLUSTER" -p "$port" -- --auth-host=trust --auth-local=peer >/dev/null
fi
port=$(pg_lsclusters -h | awk -v v="$version" -v c="$CLUSTER" '$1 == v && $2 == c {print $3}')
if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
  echo "services: starting PostgreSQL cluster '$CLUSTER'"
  pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" start
  wait_for 30 pg_isready -q -h 127.0.0.1 -p "$port" ||
    { echo "services: PostgreSQL did not come up on 127.0.0.1:$port" >&2; exit 1; }
fi
echo "WHATSLIKE_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/postgres" > .services/postgres.env
echo "services: PostgreSQL $version ready on 127.0.0.1:$port"
