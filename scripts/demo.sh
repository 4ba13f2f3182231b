#!/usr/bin/env bash
# make demo: start `moemesh up` on the demo checkpoint, stream the reply to one sample request,
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
echo "== sample request: moemesh generate --address $ADDRESS 'Hello! What can you do?'"
$MOEMESH generate --address "$ADDRESS" --max-new-tokens 32 "Hello! What can you do?"
echo
echo "== serving on $ADDRESS (grpcurl -plaintext $ADDRESS list); Ctrl-C to stop"
wait $UP
