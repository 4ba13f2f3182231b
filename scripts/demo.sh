#!/usr/bin/env bash
# make demo: start `moemesh up` on the shipped demo bot, print one exchange with it, then (on a terminal) drop
# into `moemesh chat`; leaving the chat (/quit, Ctrl-D) or Ctrl-C stops every service moemesh up started.
set -euo pipefail
cd "$(dirname "$0")/.."
MOEMESH=.venv/bin/moemesh
PORT=${MOEMESH_DEMO_PORT:-50051}
LOG=$(mktemp)

$MOEMESH up --port "$PORT" 2>&1 | tee "$LOG" &
UP=$!
stop() { kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -f "$LOG"; }
trap stop EXIT
trap 'stop; exit 0' INT TERM  # Ctrl-C is how the demo ends

until grep -q "^gateway listening on" "$LOG"; do
  if ! kill -0 $UP 2>/dev/null; then echo "moemesh up failed to start" >&2; exit 1; fi
  sleep 0.5
done
ADDRESS=$(grep -m1 "^gateway listening on" "$LOG" | awk '{print $4}')

echo
QUESTION="Hi! I'd like a refund for my headphones, they stopped working."
echo "== one exchange: echo \"$QUESTION\" | moemesh chat --address $ADDRESS"
echo "$QUESTION" | $MOEMESH chat --address "$ADDRESS"
if [ -t 0 ]; then
  echo
  echo "== your turn: moemesh chat --address $ADDRESS (/new, /session, /system TEXT, /quit; grpcurl -plaintext $ADDRESS list)"
  $MOEMESH chat --address "$ADDRESS"
fi
