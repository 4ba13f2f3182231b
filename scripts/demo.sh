#!/usr/bin/env bash
# make demo: start `moemesh up` on the shipped demo bot, ask it one customer question and stream its reply,
# then keep serving until Ctrl-C (which stops every service moemesh up started).
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
echo "== customer: $QUESTION"
echo -n "== bot: "
# One Chat turn; for a conversation, talk to it with `moemesh chat --address $ADDRESS`.
.venv/bin/python scripts/demo_ask.py "$ADDRESS" "$QUESTION"
echo
echo "== serving on $ADDRESS (grpcurl -plaintext $ADDRESS list); Ctrl-C to stop"
wait $UP
