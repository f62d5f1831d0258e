#!/usr/bin/env bash
# Apache Kafka 4.x, the real broker, from Maven Central: one KRaft node that is both
# broker and controller, on free loopback ports, data under .services/kafka/data.
# The jars (kafka_2.13 and its runtime dependencies) are fetched once with Maven into
# .services/kafka/libs. Writes .services/kafka.env.
#   kafka.sh [start|stop|status]   (stop: only the broker of this checkout's pid file)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

KAFKA_VERSION=4.1.1

case "${1:-start}" in stop | status) ;; *) apt_install maven openjdk-17-jre-headless ;; esac
# Java 17 by its own path: /usr/bin/java may be switched to another JDK on the machine.
JAVA=${JAVA:-/usr/lib/jvm/java-17-openjdk-amd64/bin/java}
[ -x "$JAVA" ] || JAVA=/usr/bin/java

dir=$PWD/.services/kafka
libs=$dir/libs

# port_free PORT: nobody listens on 127.0.0.1:PORT (connections of a broker that ended,
# still in TIME_WAIT, do not count: Kafka binds with SO_REUSEADDR too).
port_free() {
  python3 - "$1" 2>/dev/null <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
PY
}

# alive PID: the process runs (a killed one waiting to be reaped does not count).
alive() {
  ps -o stat= -p "$1" 2>/dev/null | grep -qv Z
}

# kafka_answers PORT: the broker answers an ApiVersions request (not just an open socket).
kafka_answers() {
  python3 - "$1" <<'EOF'
import socket, struct, sys
client = b"whatslike-services"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client  # ApiVersions v0
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as sock:
    sock.sendall(struct.pack(">i", len(body)) + body)
    head = sock.recv(10)
sys.exit(0 if len(head) >= 10 and struct.unpack(">h", head[8:10])[0] == 0 else 1)
EOF
}

port=$(env_value .services/kafka.env WHATSLIKE_TEST_KAFKA_PORT)
# The broker's command line names this checkout's server.properties: that is how a pid is ours.
case "${1:-start}" in
  stop) stop_own Kafka "$dir/kafka.pid" "$dir/server.properties"; exit ;;
  status)
    status_of kafka "$dir/kafka.pid" "$dir/server.properties" "${port:+127.0.0.1:$port}" \
      kafka_answers "$port"
    exit ;;
esac
mkdir -p "$dir"

if [ -n "$port" ] && kafka_answers "$port" 2>/dev/null; then
  echo "services: Kafka already running on 127.0.0.1:$port"
else
  if [ ! -f "$libs/.complete-$KAFKA_VERSION" ]; then
    echo "services: fetching Apache Kafka $KAFKA_VERSION and its dependencies with Maven"
    # The distribution's logging: log4j2 behind SLF4J 2 (kafka_2.13's pom alone brings
    # SLF4J 1.7 without a binding, which would log nothing).
    cat > "$dir/pom.xml" <<EOF
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
    mvn -B -Dstyle.color=never -f "$dir/pom.xml" dependency:copy-dependencies \
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
  # restart keeps its address and its data); taken by someone else since, new ones.
  port="" controller=""
  if [ -f "$dir/server.properties" ] && [ -f "$dir/data/meta.properties" ]; then
    port=$(sed -n 's#^listeners=PLAINTEXT://127.0.0.1:\([0-9]*\),.*#\1#p' "$dir/server.properties")
    controller=$(sed -n 's#.*CONTROLLER://127.0.0.1:\([0-9]*\)$#\1#p' "$dir/server.properties")
  else
    rm -rf "$dir/data"
  fi
  if [ -z "$port" ] || ! port_free "$port"; then port=$(free_port); fi
  if [ -z "$controller" ] || ! port_free "$controller" || [ "$controller" = "$port" ]; then
    controller=$(free_port)
    while [ "$controller" = "$port" ]; do controller=$(free_port); done
  fi
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
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
  jvm=(-Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    cluster_id=$("$JAVA" -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    echo "services: formatting Kafka storage (cluster $cluster_id)"
    "$JAVA" "${jvm[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 ||
      { cat "$dir/format.log" >&2; exit 1; }
  fi
  # Logs of deleted topics (the tests delete theirs) would each be loaded at start first.
  find "$dir/data" -maxdepth 1 -name '*-delete' -exec rm -rf {} +
  echo "services: starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller :$controller)"
  setsid nohup "$JAVA" "${jvm[@]}" -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    >"$dir/kafka.out" 2>&1 </dev/null &
  echo $! > "$dir/kafka.pid"
  wait_for 90 kafka_answers "$port" ||
    { tail -n 30 "$dir/kafka.log" "$dir/kafka.out" >&2 || true
      echo "services: Kafka did not come up on 127.0.0.1:$port" >&2; exit 1; }
fi
{
  echo "WHATSLIKE_TEST_KAFKA_PORT=$port"
  echo "WHATSLIKE_TEST_KAFKA_URL=kafka://127.0.0.1:$port"
} > .services/kafka.env
echo "services: Kafka ready on 127.0.0.1:$port"
