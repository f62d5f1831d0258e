#!/usr/bin/env bash
# PostgreSQL from Debian's packages, in a cluster of its own ("whatslike") on a free
# loopback port, trusting connections from 127.0.0.1/::1 only (the tests connect as
# postgres without a password). Writes .services/postgres.env.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

CLUSTER=whatslike
dir=.services/postgres
# The cluster is the machine's (pg_createcluster), shared by every checkout: this checkout
# stops it only if it started it (.services/postgres/cluster, written below).
case "${1:-start}" in
  stop)
    if [ ! -f "$dir/cluster" ]; then
      echo "services: PostgreSQL is not running from this checkout (the machine's cluster" \
        "'$CLUSTER' is stopped with: pg_ctlcluster VERSION $CLUSTER stop)"
      exit 0
    fi
    read -r version name < "$dir/cluster"
    echo "services: stopping PostgreSQL cluster $version/$name"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop 2>&1 | grep -v 'is not running' || true
    rm -f "$dir/cluster"
    echo "services: PostgreSQL stopped"
    exit ;;
  status)
    line=$(pg_lsclusters -h 2>/dev/null | awk -v c="$CLUSTER" '$2 == c' | sort -n | tail -n 1)
    port=$(echo "$line" | awk '{print $3}')
    if [ -n "$port" ] && pg_isready -q -h 127.0.0.1 -p "$port"; then
      whose="started from this checkout"
      [ -f "$dir/cluster" ] || whose="not started from this checkout"
      echo "postgres: running (cluster $(echo "$line" | awk '{print $1 "/" $2}')) on 127.0.0.1:$port, $whose"
    else
      echo "postgres: stopped"
      exit 3
    fi
    exit ;;
esac

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
  mkdir -p "$dir" && echo "$version $CLUSTER" > "$dir/cluster"
fi
echo "WHATSLIKE_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/postgres" > .services/postgres.env
echo "services: PostgreSQL $version ready on 127.0.0.1:$port"
