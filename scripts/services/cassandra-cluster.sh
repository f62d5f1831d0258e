#!/usr/bin/env bash
# Three Cassandra 5.0 nodes, one cluster, each on a loopback address of its own
# (127.0.0.2, 127.0.0.3, 127.0.0.4) with the same CQL and storage ports (free on all three,
# chosen at the first start and kept), data under .services/cassandra-cluster/node<N>.
# For `make test-cluster` (the fault tests of tests/cluster), not for every `make test`:
# three JVMs of up to CASSANDRA_HEAP (default 1g) each.
#
# Idempotent: a node that answers is kept; one that does not (killed by a fault test) is
# started again on its data, and rejoins. Writes .services/cassandra-cluster.env.
#   cassandra-cluster.sh [start|stop|status]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

root=$PWD/.services/cassandra-cluster
envfile=.services/cassandra-cluster.env
addresses=(127.0.0.2 127.0.0.3 127.0.0.4)
mkdir -p "$root"

port=$(env_value "$envfile" WHATSLIKE_TEST_CASSANDRA_CLUSTER_PORT)
storage_port=$(env_value "$envfile" WHATSLIKE_TEST_CASSANDRA_CLUSTER_STORAGE_PORT)
# The libraries of the single node (fetched there once), shared read-only.
libs=$PWD/.services/cassandra/libs
node() {
  local i=$1
  shift
  CASSANDRA_DIR=$root/node$i \
    CASSANDRA_ENV=$root/node$i.env \
    CASSANDRA_LIBS=$libs \
    CASSANDRA_ADDRESS=${addresses[$((i - 1))]} \
    CASSANDRA_PORT=$port \
    CASSANDRA_STORAGE_PORT=$storage_port \
    CASSANDRA_SEEDS=${addresses[0]}:$storage_port \
    CASSANDRA_CLUSTER_NAME=whatslike-cluster \
    CASSANDRA_REPLICATION=3 \
    CASSANDRA_KEEP_DATA=1 \
    scripts/services/cassandra.sh "$@"
}

# stop / status: the nodes of this checkout's pid files only (as for the single node).
case "${1:-start}" in
  stop | status)
    [ -n "$port" ] || { echo "cassandra-cluster: stopped"; [ "$1" = stop ] && exit 0 || exit 3; }
    status=0
    for i in 1 2 3; do node "$i" "$1" || status=$?; done
    exit "$status" ;;
esac

if [ -z "$port" ] || [ -z "$storage_port" ]; then
  port=$(free_on_all "${addresses[@]}")
  storage_port=$(free_on_all "${addresses[@]}")
  while [ "$storage_port" = "$port" ]; do storage_port=$(free_on_all "${addresses[@]}"); done
  rm -rf "${root:?}"/node*  # new ports: a new cluster
fi

# One node at a time: a node joins a ring only while no other is joining.
for i in 1 2 3; do node "$i"; done

hosts=$(IFS=,; echo "${addresses[*]}")
{
  echo "WHATSLIKE_TEST_CASSANDRA_CLUSTER_PORT=$port"
  echo "WHATSLIKE_TEST_CASSANDRA_CLUSTER_STORAGE_PORT=$storage_port"
  echo "WHATSLIKE_TEST_CASSANDRA_CLUSTER_DIR=$root"
  echo "WHATSLIKE_TEST_CASSANDRA_CLUSTER_URL=cassandra://$hosts:$port/whatslike?replication_factor=3"
} > "$envfile"
echo "services: Cassandra cluster of 3 ready on $hosts:$port"
