#!/usr/bin/env bash
# Redis from Debian's packages: a server of this checkout's own on a free loopback port,
# no persistence, data under .services/redis. Writes .services/redis.env.
#   redis.sh [start|stop|status]   (stop: only the server of this checkout's pid file)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

dir=.services/redis
port=$(env_value .services/redis.env WHATSLIKE_TEST_REDIS_PORT)
case "${1:-start}" in
  stop) stop_own Redis "$dir/redis.pid" redis-server; exit ;;
  status)
    status_of redis "$dir/redis.pid" redis-server "${port:+127.0.0.1:$port}" \
      sh -c "redis-cli -h 127.0.0.1 -p '$port' ping | grep -q PONG"
    exit ;;
esac

apt_install redis-server redis-tools

if [ -n "$port" ] && redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
  echo "services: Redis already running on 127.0.0.1:$port"
else
  port=$(free_port)
  mkdir -p "$dir"
  echo "services: starting Redis on 127.0.0.1:$port"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir "$PWD/$dir" --daemonize yes --pidfile "$PWD/$dir/redis.pid" \
    --logfile "$PWD/$dir/redis.log" >/dev/null
  wait_for 15 sh -c "redis-cli -h 127.0.0.1 -p $port ping | grep -q PONG" ||
    { echo "services: Redis did not come up on 127.0.0.1:$port" >&2; exit 1; }
fi
{
  echo "WHATSLIKE_TEST_REDIS_PORT=$port"
  echo "WHATSLIKE_TEST_REDIS_URL=redis://127.0.0.1:$port/0"
} > .services/redis.env
echo "services: Redis ready on 127.0.0.1:$port"
