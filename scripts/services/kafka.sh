#!/usr/bin/env bash
# Apache Kafka 4.x, the real broker, from Maven Central: one KRaft node that is both
# broker and controller, on free loopback ports, data under .services/kafka/data.
# The jars (kafka_2.13 and its runtime dependencies) are fetched once with Maven into
# .services/kafka/libs. Writes .services/kafka.env.
#   kafka.sh [start|stop|status]   (stop: only the broker of this checkout's pid file)
#
# For a node of a cluster (scripts/services/kafka-cluster.sh), these may be set:
#   KAFKA_DIR          its data, config, log and pid file (default .services/kafka)
#   KAFKA_ENV          the env file written (default .services/kafka.env)
#   KAFKA_LIBS         the jars (default $KAFKA_DIR/libs; fetched when missing)
#   KAFKA_ADDRESS      the loopback address it listens on (default 127.0.0.1)
#   KAFKA_PORT, KAFKA_CONTROLLER_PORT  its ports, kept as given (default: free ones,
#                      chosen at the first start and kept while free)
#   KAFKA_NODE_ID      its node id (default 1), KAFKA_VOTERS the controller quorum
#                      (id@address:port,...; default: itself), KAFKA_CLUSTER_ID the id its
#                      storage is formatted with (default: a new one)
#   KAFKA_REPLICATION, KAFKA_MIN_INSYNC  the replication factor and min.insync.replicas
#                      of the topics it creates, its internal ones included (default 1, 1)
#   KAFKA_HEAP         the JVM's maximum heap (default 512m)
#   KAFKA_WAIT=0       return once started, without waiting for it to answer (a node of a
#                      quorum answers only once a majority of the quorum runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

KAFKA_VERSION=4.1.1

case "${1:-start}" in stop | status) ;; *) apt_install maven openjdk-17-jre-headless ;; esac
# Java 17 by its own path: /usr/bin/java may be switched to another JDK on the machine.
JAVA=${JAVA:-/usr/lib/jvm/java-17-openjdk-amd64/bin/java}
[ -x "$JAVA" ] || JAVA=/usr/bin/java

dir=${KAFKA_DIR:-$PWD/.services/kafka}
envfile=${KAFKA_ENV:-.services/kafka.env}
libs=${KAFKA_LIBS:-$dir/libs}
# Not "address": status_of (lib.sh) has a local of that name, seen by kafka_answers.
host=${KAFKA_ADDRESS:-127.0.0.1}
node_id=${KAFKA_NODE_ID:-1}
replication=${KAFKA_REPLICATION:-1}
min_insync=${KAFKA_MIN_INSYNC:-1}

# port_free PORT: nobody listens on $host:PORT (connections of a broker that ended,
# still in TIME_WAIT, do not count: Kafka binds with SO_REUSEADDR too).
port_free() {
  python3 - "$host" "$1" 2>/dev/null <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
PY
}

# alive PID: the process runs (a killed one waiting to be reaped does not count).
alive() {
  ps -o stat= -p "$1" 2>/dev/null | grep -qv Z
}

# kafka_answers PORT: the broker answers an ApiVersions request (not just an open socket).
kafka_answers() {
  python3 - "$host" "$1" <<'EOF'
import socket, struct, sys
client = b"whatslike-services"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client  # ApiVersions v0
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as sock:
    sock.sendall(struct.pack(">i", len(body)) + body)
    head = sock.recv(10)
sys.exit(0 if len(head) >= 10 and struct.unpack(">h", head[8:10])[0] == 0 else 1)
EOF
}

port=${KAFKA_PORT:-$(env_value "$envfile" WHATSLIKE_TEST_KAFKA_PORT)}
# The broker's command line names this checkout's server.properties: that is how a pid is ours.
case "${1:-start}" in
  stop) stop_own Kafka "$dir/kafka.pid" "$dir/server.properties"; exit ;;
  status)
    status_of kafka "$dir/kafka.pid" "$dir/server.properties" "${port:+$host:$port}" \
      kafka_answers "$port"
    exit ;;
esac
mkdir -p "$dir"

if [ -n "$port" ] && kafka_answers "$port" 2>/dev/null; then
  echo "services: Kafka already running on $host:$port"
else
  if [ ! -f "$libs/.complete-$KAFKA_VERSION" ]; then
    echo "services: fetching Apache Kafka $KAFKA_VERSION and its dependencies with Maven"
    mkdir -p "$(dirname "$libs")"
    # The distribution's logging: log4j2 behind SLF4J 2 (kafka_2.13's pom alone brings
    # SLF4J 1.7 without a binding, which would log nothing).
    pom=$(dirname "$libs")/pom.xml
    cat > "$pom" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>whatslike.services</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>2.0.17</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
EOF
    rm -rf "$libs"
    mvn -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
      -DoutputDirectory="$libs" -DincludeScope=runtime >"$dir/maven.log" 2>&1 ||
      { tail -n 30 "$dir/maven.log" >&2; echo "services: Maven could not fetch Kafka" >&2; exit 1; }
    touch "$libs/.complete-$KAFKA_VERSION"
  fi

  # A stale broker of ours (not answering, or its env file lost) is stopped first.
  if [ -f "$dir/kafka.pid" ] && alive "$(cat "$dir/kafka.pid")"; then
    pid=$(cat "$dir/kafka.pid")
    echo "services: stopping the unresponsive Kafka (pid $pid)"
    kill "$pid"
    wait_for 30 sh -c "! ps -o stat= -p $pid | grep -qv Z" || kill -9 "$pid" || true
  fi
  # Ports are chosen once and kept in server.properties, with the formatted storage (so a
  # restart keeps its address and its data); taken by someone else since, new ones. A
  # node of a cluster is given its ports (the quorum names them) and keeps them.
  port=${KAFKA_PORT:-} controller=${KAFKA_CONTROLLER_PORT:-}
  if [ -f "$dir/server.properties" ] && [ -f "$dir/data/meta.properties" ]; then
    [ -n "$port" ] ||
      port=$(sed -n 's#^listeners=PLAINTEXT://[0-9.]*:\([0-9]*\),.*#\1#p' "$dir/server.properties")
    [ -n "$controller" ] ||
      controller=$(sed -n 's#.*CONTROLLER://[0-9.]*:\([0-9]*\)$#\1#p' "$dir/server.properties")
  else
    rm -rf "$dir/data"
  fi
  if [ -z "${KAFKA_PORT:-}" ] && { [ -z "$port" ] || ! port_free "$port"; }; then port=$(free_port); fi
  if [ -z "${KAFKA_CONTROLLER_PORT:-}" ] &&
    { [ -z "$controller" ] || ! port_free "$controller" || [ "$controller" = "$port" ]; }; then
    controller=$(free_port)
    while [ "$controller" = "$port" ]; do controller=$(free_port); done
  fi
  voters=${KAFKA_VOTERS:-$node_id@$host:$controller}
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
listeners=PLAINTEXT://$host:$port,CONTROLLER://$host:$controller
advertised.listeners=PLAINTEXT://$host:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$replication
min.insync.replicas=$min_insync
unclean.leader.election.enable=false
offsets.topic.replication.factor=$replication
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_insync
share.coordinator.state.topic.replication.factor=$replication
share.coordinator.state.topic.min.isr=$min_insync
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=24
# After a crash the node re-registers only once its previous session expired (default 9 s).
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
EOF
  cat > "$dir/log4j2.properties" <<EOF
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
appender.file.type=RollingFile
appender.file.name=file
appender.file.fileName=$dir/kafka.log
appender.file.filePattern=$dir/kafka.log.%i
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
appender.file.policies.type=Policies
appender.file.policies.size.type=SizeBasedTriggeringPolicy
appender.file.policies.size.size=20MB
appender.file.strategy.type=DefaultRolloverStrategy
appender.file.strategy.max=2
logger.state.name=state.change.logger
logger.state.level=WARN
EOF
  jvm=(-Xms128m "-Xmx${KAFKA_HEAP:-512m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    cluster_id=${KAFKA_CLUSTER_ID:-$("$JAVA" -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)}
    echo "services: formatting Kafka storage (cluster $cluster_id)"
    "$JAVA" "${jvm[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 ||
      { cat "$dir/format.log" >&2; exit 1; }
  fi
  # Logs of deleted topics (the tests delete theirs) would each be loaded at start first.
  find "$dir/data" -maxdepth 1 -name '*-delete' -exec rm -rf {} +
  echo "services: starting Kafka $KAFKA_VERSION on $host:$port (controller :$controller)"
  setsid nohup "$JAVA" "${jvm[@]}" -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    >"$dir/kafka.out" 2>&1 </dev/null &
  echo $! > "$dir/kafka.pid"
  [ "${KAFKA_WAIT:-1}" != 0 ] || exit 0
  wait_for 90 kafka_answers "$port" ||
    { tail -n 30 "$dir/kafka.log" "$dir/kafka.out" >&2 || true
      echo "services: Kafka did not come up on $host:$port" >&2; exit 1; }
fi
{
  echo "WHATSLIKE_TEST_KAFKA_PORT=$port"
  echo "WHATSLIKE_TEST_KAFKA_URL=kafka://$host:$port"
} > "$envfile"
echo "services: Kafka ready on $host:$port"
