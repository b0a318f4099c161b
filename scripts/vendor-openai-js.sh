#!/usr/bin/env bash
# Rebuilds auth_proxy/static/vendor/openai-<version>.min.mjs: the openai JS SDK (pinned) bundled
# into one ES module for the toolbar page, which then needs no build step and no internet.
# Needs node and npm (registry access); run it only to change the pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-7.57.0}"
ESBUILD=0.25.0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && echo '{"private":true}' > package.json \
    && npm install --silent --no-audit --no-fund "openai@$VERSION" "esbuild@$ESBUILD" \
    && echo "export { OpenAI } from 'openai';" > entry.mjs \
    && ./node_modules/.bin/esbuild entry.mjs --bundle --format=esm --platform=browser --minify \
        --legal-comments=inline --outfile=openai.min.mjs)
rm -f auth_proxy/static/vendor/openai-*.min.mjs
cp "$work/openai.min.mjs" "auth_proxy/static/vendor/openai-$VERSION.min.mjs"
echo "auth_proxy/static/vendor/openai-$VERSION.min.mjs; update the import in auth_proxy/static/app.js"
