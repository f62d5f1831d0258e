#!/usr/bin/env bash
# Make sure what the browser tests need is on this machine: Debian's Chromium (Playwright
# cannot download browsers here; the tests point it at /usr/bin/chromium) and Node.js
# for the client's unit tests. Installs them with apt when missing (CI runs as root).
set -euo pipefail

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "browser: installing ${need[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "browser: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
echo "browser: $(/usr/bin/chromium --version 2>/dev/null | head -n1), node $(node --version)"
