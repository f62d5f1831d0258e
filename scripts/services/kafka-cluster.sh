#!/usr/bin/env bash
# Three Apache Kafka brokers, one KRaft cluster, each on a loopback address of its own
# (127.0.0.2, 127.0.0.3, 127.0.0.4) with the same broker and controller ports (free on all
# three, chosen at the first start and kept), each broker and controller (a quorum of 3:
# one may be lost), data under .services/kafka-cluster/node<N>. Topics get 3 replicas and
# min.insync.replicas=2 (the internal ones too), so with the producer's acks=all a record
# acknowledged is on two brokers at least. For `make test-cluster`, not for every
# `make test`: three JVMs of up to KAFKA_HEAP (default 384m) each.
#
# Idempotent: a broker that answers is kept; one that does not (killed by a fault test) is
# started again on its data, and rejoins. Writes .services/kafka-cluster.env.
#   kafka-cluster.sh [start|stop|status]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

root=$PWD/.services/kafka-cluster
envfile=.services/kafka-cluster.env
addresses=(127.0.0.2 127.0.0.3 127.0.0.4)
mkdir -p "$root"

# answers ADDRESS PORT: the broker there answers an ApiVersions request.
answers() {
  python3 -c '
import socket, struct, sys
client = b"whatslike-services"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client  # ApiVersions v0
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as sock:
    sock.sendall(struct.pack(">i", len(body)) + body)
    head = sock.recv(10)
sys.exit(0 if len(head) >= 10 and struct.unpack(">h", head[8:10])[0] == 0 else 1)
' "$@"
}

port=$(env_value "$envfile" WHATSLIKE_TEST_KAFKA_CLUSTER_PORT)
controller=$(env_value "$envfile" WHATSLIKE_TEST_KAFKA_CLUSTER_CONTROLLER_PORT)
cluster_id=$(env_value "$envfile" WHATSLIKE_TEST_KAFKA_CLUSTER_ID)

# node N [ACTION]: scripts/services/kafka.sh for broker N of the cluster.
node() {
  local i=$1
  shift
  KAFKA_DIR=$root/node$i \
    KAFKA_ENV=$root/node$i.env \
    KAFKA_LIBS=$PWD/.services/kafka/libs \
    KAFKA_ADDRESS=${addresses[$((i - 1))]} \
    KAFKA_PORT=$port \
    KAFKA_CONTROLLER_PORT=$controller \
    KAFKA_NODE_ID=$i \
    KAFKA_VOTERS=$voters \
    KAFKA_CLUSTER_ID=$cluster_id \
    KAFKA_REPLICATION=3 \
    KAFKA_MIN_INSYNC=2 \
    KAFKA_HEAP=${KAFKA_HEAP:-384m} \
    KAFKA_WAIT=0 \
    scripts/services/kafka.sh "$@"
}

case "${1:-start}" in
  stop | status)
    [ -n "$port" ] || { echo "kafka-cluster: stopped"; [ "$1" = stop ] && exit 0 || exit 3; }
    voters="" status=0
    for i in 1 2 3; do node "$i" "$1" || status=$?; done
    exit "$status" ;;
esac

if [ -z "$port" ] || [ -z "$controller" ] || [ -z "$cluster_id" ]; then
  port=$(free_on_all "${addresses[@]}")
  controller=$(free_on_all "${addresses[@]}")
  while [ "$controller" = "$port" ]; do controller=$(free_on_all "${addresses[@]}"); done
  cluster_id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
  rm -rf "${root:?}"/node*  # new ports: a new cluster
  mkdir -p "$root"
fi
voters=""
for i in 1 2 3; do voters+="${voters:+,}$i@${addresses[$((i - 1))]}:$controller"; done
# The env file first: a start cut short leaves the ports and cluster id to the next one.
write_env() {
  local servers
  servers=$(printf "%s:$port," "${addresses[@]}")
  {
    echo "WHATSLIKE_TEST_KAFKA_CLUSTER_PORT=$port"
    echo "WHATSLIKE_TEST_KAFKA_CLUSTER_CONTROLLER_PORT=$controller"
    echo "WHATSLIKE_TEST_KAFKA_CLUSTER_ID=$cluster_id"
    echo "WHATSLIKE_TEST_KAFKA_CLUSTER_DIR=$root"
    echo "WHATSLIKE_TEST_KAFKA_CLUSTER_URL=kafka://${servers%,}"
  } > "$envfile"
}
write_env
# All three at once: a node answers only once a majority of the quorum runs.
for i in 1 2 3; do node "$i"; done
for i in 1 2 3; do
  address=${addresses[$((i - 1))]}
  wait_for 120 answers "$address" "$port" ||
    { tail -n 30 "$root/node$i/kafka.log" "$root/node$i/kafka.out" >&2 || true
      echo "services: Kafka broker $i did not come up on $address:$port" >&2; exit 1; }
done
echo "services: Kafka cluster of 3 ready on $(IFS=,; echo "${addresses[*]}"):$port"
