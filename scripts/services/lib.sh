# Helpers shared by the service scripts (sourced, not run).

# apt_install PKG...: install Debian packages when missing (we run as root on Debian).
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "services: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
    return 1
  fi
  echo "services: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# free_port: a TCP port nobody listens on right now, on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# env_value FILE NAME: the value of NAME=… in FILE, or nothing.
env_value() {
  [ -f "$1" ] && sed -n "s/^$2=//p" "$1" | tail -n 1 || true
}

# wait_for SECONDS COMMAND...: run COMMAND every half second until it succeeds.
wait_for() {
  local limit=$1; shift
  local tries=$((limit * 2))
  for _ in $(seq 1 "$tries"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

# running PID: the process runs (a killed one waiting to be reaped does not count).
running() {
  ps -o stat= -p "$1" 2>/dev/null | grep -qv Z
}

# own_pid PIDFILE PATTERN: print the pid in PIDFILE if that process runs and its command line
# holds PATTERN (so a pid reused by another process, or a stale file, is not ours).
own_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(tr -cd '0-9' < "$1")
  [ -n "$pid" ] && running "$pid" && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$2" || return 1
  echo "$pid"
}

# stop_own NAME PIDFILE PATTERN: stop the server this checkout started (its pid file under
# .services/<name>/): SIGTERM, up to 60 s to finish, then SIGKILL. Nothing else is touched.
stop_own() {
  local name=$1 pidfile=$2 pid
  if ! pid=$(own_pid "$pidfile" "$3"); then
    echo "services: $name is not running from this checkout"
    rm -f "$pidfile"
    return 0
  fi
  echo "services: stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  if ! wait_for 60 sh -c "! ps -o stat= -p $pid | grep -qv Z"; then
    echo "services: $name (pid $pid) did not stop in 60 s; killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "services: $name stopped"
}

# status_of NAME PIDFILE PATTERN ADDRESS CHECK...: one line on NAME; CHECK (a command) tells
# whether ADDRESS answers. Returns 3 when nothing answers there (LSB's "not running").
status_of() {
  local name=$1 pidfile=$2 pattern=$3 address=$4 pid
  shift 4
  local answers=no
  [ -n "$address" ] && "$@" >/dev/null 2>&1 && answers=yes
  if pid=$(own_pid "$pidfile" "$pattern"); then
    if [ $answers = yes ]; then
      echo "$name: running (pid $pid) on $address"
    else
      echo "$name: running (pid $pid), not answering${address:+ on $address} yet"
    fi
  elif [ $answers = yes ]; then
    echo "$name: answers on $address, not started from this checkout (no pid file here)"
  else
    echo "$name: stopped"
    return 3
  fi
}

# free_on_all ADDRESS...: a TCP port nobody listens on at any of the ADDRESSes (the
# clusters' nodes share port numbers on addresses of their own).
free_on_all() {
  python3 - "$@" <<'PY'
import socket, sys
while True:
    with socket.socket() as first:
        first.bind((sys.argv[1], 0))
        port = first.getsockname()[1]
        try:
            for address in sys.argv[2:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
    print(port)
    break
PY
}
