#!/usr/bin/env bash
# Apache Cassandra 5.0, the real server: cassandra-all and its runtime dependencies from
# Maven Central (into .services/cassandra/libs), run on Java 17 with the JVM options of
# Cassandra's own conf/jvm17-server.options (kept in cassandra-jvm17-server.options beside
# this script), a small heap, one node on 127.0.0.1 with its CQL and storage ports free
# loopback ports chosen at first start, no JMX, data under .services/cassandra.
# Writes .services/cassandra.env.
#
# Writes are acknowledged only once in the commit log on disk: `commitlog_sync: batch`
# (Cassandra's default, `periodic`, acknowledges first and syncs every 10 s, so a node
# killed or powered off loses up to 10 s of acknowledged writes).
#
# For a node of one's own (tests that kill one, measurements), these may be set:
#   CASSANDRA_DIR      its data, config and pid file (default .services/cassandra)
#   CASSANDRA_ENV      the env file written (default .services/cassandra.env)
#   CASSANDRA_LIBS     the jars (default $CASSANDRA_DIR/libs; fetched when missing)
#   CASSANDRA_COMMITLOG_SYNC  batch (default), group (CASSANDRA_COMMITLOG_GROUP_WINDOW,
#                      default 10ms) or periodic (only to measure what durability costs)
#   CASSANDRA_HEAP     the JVM's maximum heap (default 1g)
# and, for a node of a cluster (scripts/services/cassandra-cluster.sh):
#   CASSANDRA_ADDRESS  the loopback address it listens on (default 127.0.0.1)
#   CASSANDRA_PORT, CASSANDRA_STORAGE_PORT  its ports (default: free ones)
#   CASSANDRA_SEEDS    address:storage_port of the seed (default: itself)
#   CASSANDRA_CLUSTER_NAME, CASSANDRA_REPLICATION  the cluster's name, and the replication
#                      factor its tokens are spread for (default 1)
#   CASSANDRA_KEEP_DATA=1  a restart keeps the node's data (so it rejoins its cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

VERSION=5.0.9
dir=${CASSANDRA_DIR:-$PWD/.services/cassandra}
envfile=${CASSANDRA_ENV:-.services/cassandra.env}
libs=${CASSANDRA_LIBS:-$dir/libs}
heap=${CASSANDRA_HEAP:-1g}
address=${CASSANDRA_ADDRESS:-127.0.0.1}
case ${CASSANDRA_COMMITLOG_SYNC:-batch} in
  batch) commitlog="commitlog_sync: batch" ;;
  group) commitlog="commitlog_sync: group
commitlog_sync_group_window: ${CASSANDRA_COMMITLOG_GROUP_WINDOW:-10ms}" ;;
  periodic) commitlog="commitlog_sync: periodic
commitlog_sync_period: 10000ms" ;;
  *) echo "services: CASSANDRA_COMMITLOG_SYNC must be batch, group or periodic" >&2; exit 2 ;;
esac

# cql_ready PORT: the node answers a CQL OPTIONS request (protocol v4) with SUPPORTED.
cql_ready() {
  python3 - "$address" "$1" <<'PY'
import socket, struct, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
    s.sendall(struct.pack(">BBhBi", 0x04, 0, 0, 0x05, 0))  # version, flags, stream, OPTIONS, length
    header = s.recv(9)
sys.exit(0 if len(header) == 9 and header[0] == 0x84 and header[4] == 0x06 else 1)
PY
}

# ours PIDFILE: the pid in it is still our CassandraDaemon, not a process that reused it.
ours() {
  [ -f "$1" ] && tr '\0' ' ' 2>/dev/null < "/proc/$(cat "$1")/cmdline" |
    grep -q -- "-Dcassandra.config=file://$dir/cassandra.yaml"
}
pidfile=$dir/cassandra.pid

port=$(env_value "$envfile" WHATSLIKE_TEST_CASSANDRA_PORT)
# stop / status: only the node of this checkout's pid file (its command line names our yaml).
case "${1:-start}" in
  stop) stop_own Cassandra "$dir/cassandra.pid" "-Dcassandra.config=file://$dir/cassandra.yaml"; exit ;;
  status)
    status_of cassandra "$dir/cassandra.pid" "-Dcassandra.config=file://$dir/cassandra.yaml" \
      "${port:+$address:$port}" cql_ready "$port"
    exit ;;
esac
if [ -n "$port" ] && cql_ready "$port" 2>/dev/null; then
  # A node this script started with an older config (e.g. periodic commit-log sync) is
  # stopped below and started afresh; any other node that answers there is kept.
  if ! ours "$pidfile" || grep -qxF "$(head -n 1 <<< "$commitlog")" "$dir/cassandra.yaml"; then
    echo "services: Cassandra already running on $address:$port"
    exit 0
  fi
  echo "services: the Cassandra on $address:$port runs an older config; restarting it"
fi

command -v java >/dev/null || apt_install openjdk-17-jre-headless
command -v mvn >/dev/null || apt_install maven
java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
[ "$java_major" = 17 ] || { echo "services: Cassandra $VERSION needs Java 17, 'java' is $java_major" >&2; exit 1; }

if [ ! -f "$libs/cassandra-all-$VERSION.jar" ]; then
  echo "services: fetching cassandra-all $VERSION and its dependencies from Maven Central"
  mkdir -p "$dir" "$(dirname "$libs")"
  cat > "$dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>whatslike.services</groupId>
  <artifactId>cassandra-libs</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  rm -rf "$libs.tmp"
  mvn -B -f "$dir/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$libs.tmp" > "$dir/mvn.log" 2>&1 ||
    { tail -n 30 "$dir/mvn.log" >&2; echo "services: Maven failed, see $dir/mvn.log" >&2; exit 1; }
  rm -rf "$libs" && mv "$libs.tmp" "$libs"
fi

# A node of this checkout that runs but does not answer (yet, or any more), or runs an
# older config: stop it and start afresh.
if ours "$pidfile"; then
  pid=$(cat "$pidfile")
  echo "services: stopping Cassandra pid $pid"
  kill "$pid"
  wait_for 30 sh -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
fi

port=${CASSANDRA_PORT:-$(free_port)}
storage_port=${CASSANDRA_STORAGE_PORT:-$(free_port)}
while [ "$storage_port" = "$port" ]; do storage_port=$(free_port); done
seeds=${CASSANDRA_SEEDS:-$address:$storage_port}
if [ "${CASSANDRA_KEEP_DATA:-}" != 1 ]; then
  # Test data is disposable: every start is a fresh single-node cluster on the new ports.
  rm -rf "${dir:?}"/system.log "${dir:?}"/{data,commitlog,saved_caches,hints,cdc_raw,triggers}
fi
mkdir -p "$dir"/{data,commitlog,saved_caches,hints,cdc_raw,triggers}

cat > "$dir/cassandra.yaml" <<YAML
cluster_name: ${CASSANDRA_CLUSTER_NAME:-whatslike-test}
num_tokens: 4
allocate_tokens_for_local_replication_factor: ${CASSANDRA_REPLICATION:-1}
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$seeds"
listen_address: $address
rpc_address: $address
storage_port: $storage_port
ssl_storage_port: $storage_port
native_transport_port: $port
start_native_transport: true
data_file_directories: [$dir/data]
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
cdc_raw_directory: $dir/cdc_raw
# Acknowledge a write only once it is in the commit log on disk.
$commitlog
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
# Tests create and drop a keyspace each: no snapshot on drop/truncate keeps that cheap.
auto_snapshot: false
# Paxos v2 needs fewer round trips per lightweight transaction than v1.
paxos_variant: v2
YAML

cat > "$dir/logback.xml" <<XML
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$dir/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
XML

mapfile -t options < <(grep -E '^-' scripts/services/cassandra-jvm17-server.options)
cmd=(java "${options[@]}" -Xms512m "-Xmx$heap" -XX:+ExitOnOutOfMemoryError
  "-javaagent:$(ls "$libs"/jamm-*.jar)"
  -Dcassandra.config="file://$dir/cassandra.yaml"
  -Dcassandra.storagedir="$dir"
  -Dcassandra.triggers_dir="$dir/triggers"
  -Dcassandra.ring_delay_ms=1000
  -Dcassandra-pidfile="$pidfile"
  -Dlogback.configurationFile="file://$dir/logback.xml"
  -Dcassandra.logdir="$dir"
  -cp "$libs/*" org.apache.cassandra.service.CassandraDaemon)
echo "services: starting Cassandra $VERSION on $address:$port (storage port $storage_port)"
echo "${cmd[*]}" > "$dir/command.txt"
setsid "${cmd[@]}" > "$dir/stdout.log" 2>&1 < /dev/null &
echo $! > "$pidfile"
if ! wait_for 180 cql_ready "$port"; then
  echo "services: Cassandra did not come up on $address:$port; the end of $dir/system.log:" >&2
  tail -n 30 "$dir/system.log" "$dir/stdout.log" >&2 || true
  exit 1
fi
{
  echo "WHATSLIKE_TEST_CASSANDRA_PORT=$port"
  echo "WHATSLIKE_TEST_CASSANDRA_URL=cassandra://$address:$port/whatslike"
} > "$envfile"
echo "services: Cassandra $VERSION ready on $address:$port"
