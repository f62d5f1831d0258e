#!/usr/bin/env bash
# Make sure the servers the tests talk to are up on their standard local ports:
# PostgreSQL (5432). Starts it if it is installed but down; installs it with apt on a
# Debian machine where it is missing (we run as root there). Prints what it did.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "services: installing PostgreSQL with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "services: PostgreSQL is not installed; install it or set WHATSLIKE_TEST_POSTGRES_URL" >&2
    exit 1
  fi
fi

if ! pg_up; then
  echo "services: starting PostgreSQL"
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "services: PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
echo "services: PostgreSQL ready on 127.0.0.1:5432"
