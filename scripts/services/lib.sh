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
