#!/usr/bin/env bash
# make demo: start `moemesh up` on the shipped demo bot, print one exchange with it, then (on a terminal) drop
# into `moemesh chat`. Leaving the chat (/quit, Ctrl-D), Ctrl-C, or the end of the exchange without a terminal
# stops every service `moemesh up` started, and the demo exits 0. MOEMESH_DEMO_PORT: the gateway's port;
# PYTHON: the interpreter with moemesh installed (default: the project's .venv).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${MOEMESH_DEMO_PORT:-50051}
OUT=$(mktemp)

# `up` writes to a file that `tail` shows: $! is then `up` itself, the process to stop.
"$PYTHON" -m moemesh.cli up --port "$PORT" >"$OUT" 2>&1 &
UP=$!
tail -n +1 -f --pid="$UP" "$OUT" &
TAIL=$!

stop() {
  trap - EXIT INT TERM
  kill -TERM "$UP" 2>/dev/null
  wait "$UP" 2>/dev/null
  wait "$TAIL" 2>/dev/null  # it ends with `up`, having shown its last lines
  rm -f "$OUT"
}
trap stop EXIT
trap 'exit 0' INT TERM  # Ctrl-C is one way the demo ends: the EXIT trap stops the cluster

until ADDRESS=$(sed -n 's/^gateway listening on //p' "$OUT") && [ -n "$ADDRESS" ]; do
  if ! kill -0 "$UP" 2>/dev/null; then
    wait "$TAIL" 2>/dev/null
    echo "make demo: moemesh up failed to start (its output is above)" >&2
    exit 1
  fi
  sleep 0.5
done

echo
QUESTION="Hi! I'd like a refund for my headphones, they stopped working."
echo "== one exchange: echo \"$QUESTION\" | moemesh chat --address $ADDRESS"
echo "$QUESTION" | "$PYTHON" -m moemesh.cli chat --address "$ADDRESS" || exit 1
if [ -t 0 ]; then
  echo
  echo "== your turn: moemesh chat --address $ADDRESS (/new, /session, /system TEXT, /quit or Ctrl-D to stop the demo)"
  "$PYTHON" -m moemesh.cli chat --address "$ADDRESS"
fi
echo "== stopping the cluster"
