"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

RUNNING = Gauge("moemesh_gateway_running_sequences", "Sequences in the running batch")
WAITING = Gauge("moemesh_gateway_waiting_requests", "Requests waiting for admission")
GENERATED_TOKENS = Counter("moemesh_gateway_generated_tokens_total", "Tokens generated")
STEP_SECONDS = Histogram("moemesh_gateway_step_seconds", "Wall time of one engine step")
