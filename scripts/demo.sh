#!/usr/bin/env bash
# `make demo`: start the embedded stack (SQLite, local storage, server-less broker, tiny demo
# checkpoint), run a real try-on batch through the HTTP API with `bagel-jobs demo`, stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export BAGEL_JOBS_API_PORT="${BAGEL_JOBS_API_PORT:-8765}"
export BAGEL_JOBS_PUBLIC_BASE_URL="${BAGEL_JOBS_PUBLIC_BASE_URL:-http://127.0.0.1:${BAGEL_JOBS_API_PORT}}"
export BAGEL_JOBS_WEBHOOK_ALLOW_PRIVATE="${BAGEL_JOBS_WEBHOOK_ALLOW_PRIVATE:-true}"
mkdir -p var
$BIN/bagel-jobs db upgrade
$BIN/bagel-jobs up >var/demo-stack.log 2>&1 &
stack=$!
trap 'kill -TERM $stack 2>/dev/null; wait $stack 2>/dev/null || true' EXIT
$BIN/bagel-jobs demo --api-url "$BAGEL_JOBS_PUBLIC_BASE_URL" --wait-ready-s 120
# The demo's last line is its batch's gallery link. The stack stops now; the database, results and
# signing key stay in var/, so the link works again once the stack is back on the same port.
echo "[demo] stack stopping; to open the gallery link again: BAGEL_JOBS_API_PORT=$BAGEL_JOBS_API_PORT $BIN/bagel-jobs up" >&2
