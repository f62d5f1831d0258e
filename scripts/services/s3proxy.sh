#!/usr/bin/env bash
# S3Proxy (org.gaul:s3proxy, Apache-2.0), a real S3 server (SigV2/SigV4, pre-signed URLs,
# multipart uploads) on the jclouds filesystem backend: its jars from Maven Central, a free
# loopback port chosen at its first start, objects under .services/s3proxy/data, one bucket
# the tests share (each test uses keys of its own). Writes .services/s3proxy.env.
#   s3proxy.sh [start|stop|status]   (stop: only the server of this checkout's pid file)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services/lib.sh

# 2.x is the line on jclouds' filesystem provider built for Java 17 (3.x adds the Azure and
# Google SDKs to its dependencies, 4.x drops jclouds for backends of its own).
S3PROXY_VERSION=2.9.0
BUCKET=whatslike-test

case "${1:-start}" in stop | status) ;; *) apt_install maven openjdk-17-jre-headless ;; esac
# Java 17 by its own path: /usr/bin/java may be switched to another JDK on the machine.
JAVA=${JAVA:-/usr/lib/jvm/java-17-openjdk-amd64/bin/java}
[ -x "$JAVA" ] || JAVA=/usr/bin/java

dir=$PWD/.services/s3proxy
envfile=.services/s3proxy.env
libs=$dir/libs
port=$(env_value "$envfile" WHATSLIKE_TEST_S3_PORT)

# s3_answers PORT: an S3 server answers there (an anonymous request is refused with S3's
# XML error, not a closed socket).
s3_answers() {
  curl -s -m 2 "http://127.0.0.1:$1/" | grep -q '<Error>\|ListAllMyBucketsResult'
}

case "${1:-start}" in
  stop) stop_own S3Proxy "$dir/s3proxy.pid" "$dir/s3proxy.properties"; exit ;;
  status)
    status_of s3proxy "$dir/s3proxy.pid" "$dir/s3proxy.properties" "${port:+127.0.0.1:$port}" \
      s3_answers "$port"
    exit ;;
esac
mkdir -p "$dir"

if [ -n "$port" ] && s3_answers "$port"; then
  echo "services: S3Proxy already running on 127.0.0.1:$port"
else
  if [ ! -f "$libs/.complete-$S3PROXY_VERSION" ]; then
    echo "services: fetching S3Proxy $S3PROXY_VERSION and its dependencies with Maven"
    cat > "$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>whatslike.services</groupId>
  <artifactId>s3proxy-server</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.gaul</groupId>
      <artifactId>s3proxy</artifactId>
      <version>$S3PROXY_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    rm -rf "$libs"
    mvn -B -Dstyle.color=never -f "$dir/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$libs" -DincludeScope=runtime >"$dir/maven.log" 2>&1 ||
      { tail -n 30 "$dir/maven.log" >&2; echo "services: Maven could not fetch S3Proxy" >&2; exit 1; }
    touch "$libs/.complete-$S3PROXY_VERSION"
  fi

  # A stale server of ours (not answering, or its env file lost) is stopped first.
  if pid=$(own_pid "$dir/s3proxy.pid" "$dir/s3proxy.properties"); then
    echo "services: stopping the unresponsive S3Proxy (pid $pid)"
    kill "$pid"
    wait_for 30 sh -c "! ps -o stat= -p $pid | grep -qv Z" || kill -9 "$pid" || true
  fi
  # The credentials are this checkout's own, made once (the server listens on loopback only).
  identity=$(env_value "$envfile" WHATSLIKE_TEST_S3_ACCESS_KEY)
  credential=$(env_value "$envfile" WHATSLIKE_TEST_S3_SECRET_KEY)
  [ -n "$identity" ] || identity=whatslike-$(python3 -c 'import secrets; print(secrets.token_hex(6))')
  [ -n "$credential" ] || credential=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
  port=$(free_port)
  mkdir -p "$dir/data/$BUCKET"
  (umask 077 && cat > "$dir/s3proxy.properties" <<EOF
s3proxy.endpoint=http://127.0.0.1:$port
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity=$identity
s3proxy.credential=$credential
jclouds.provider=filesystem
jclouds.filesystem.basedir=$dir/data
EOF
  )
  echo "services: starting S3Proxy $S3PROXY_VERSION on 127.0.0.1:$port"
  setsid nohup "$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -Djava.awt.headless=true \
    -cp "$libs/*" org.gaul.s3proxy.Main --properties "$dir/s3proxy.properties" \
    >"$dir/s3proxy.log" 2>&1 </dev/null &
  echo $! > "$dir/s3proxy.pid"
  wait_for 60 s3_answers "$port" ||
    { tail -n 30 "$dir/s3proxy.log" >&2 || true
      echo "services: S3Proxy did not come up on 127.0.0.1:$port" >&2; exit 1; }
fi
identity=$(sed -n 's/^s3proxy.identity=//p' "$dir/s3proxy.properties")
credential=$(sed -n 's/^s3proxy.credential=//p' "$dir/s3proxy.properties")
(umask 077 && {
  echo "WHATSLIKE_TEST_S3_PORT=$port"
  echo "WHATSLIKE_TEST_S3_URL=http://127.0.0.1:$port"
  echo "WHATSLIKE_TEST_S3_BUCKET=$BUCKET"
  echo "WHATSLIKE_TEST_S3_ACCESS_KEY=$identity"
  echo "WHATSLIKE_TEST_S3_SECRET_KEY=$credential"
} > "$envfile")
echo "services: S3Proxy ready on 127.0.0.1:$port"
