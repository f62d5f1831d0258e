#!/usr/bin/env bash
# Vendor Swagger UI (the renderer of the API's page, /docs) from npm's swagger-ui-dist into
# whatslike/static/swagger-ui/: only the files the page loads, with the licence and notice.
# Run it by hand to move to another version (then update VERSION and INTEGRITY below from
# `npm view swagger-ui-dist@<version> dist.integrity`); nothing fetches it at run time.
set -euo pipefail

VERSION=5.35.0
INTEGRITY='sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=='
FILES=(swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE)

here="$(cd "$(dirname "$0")/.." && pwd)"
target="$here/whatslike/static/api-docs/swagger-ui"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
got="$(npm pack "swagger-ui-dist@$VERSION" --json --silent | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["integrity"])')"
if [ "$got" != "$INTEGRITY" ]; then
  echo "vendor-swagger-ui: swagger-ui-dist@$VERSION has integrity $got, expected $INTEGRITY" >&2
  exit 1
fi
tar -xzf "swagger-ui-dist-$VERSION.tgz"
rm -rf "$target"
mkdir -p "$target"
for name in "${FILES[@]}"; do
  cp "package/$name" "$target/$name"
done
# The source map reference points at a file not vendored: browsers would ask for it.
sed -i '/^\/\/# sourceMappingURL=/d' "$target/swagger-ui-bundle.js"
sed -i 's#/\*\# sourceMappingURL=[^*]*\*/##' "$target/swagger-ui.css"
echo "$VERSION" > "$target/VERSION"
echo "vendor-swagger-ui: swagger-ui-dist $VERSION in ${target#"$here"/}"
