"""Prometheus metrics of the gateway, named as vLLM/TGI users graph them (README: Observability).

No label takes a value from a client: `method` is a Gateway method name, `code` a gRPC status code name.
"""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "moemesh_time_to_first_token_seconds", "From submission to the first generated token", buckets=_LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "moemesh_inter_token_latency_seconds", "Between two generated tokens of one sequence", buckets=_TOKEN_BUCKETS
)
E2E_REQUEST_LATENCY = Histogram(
    "moemesh_e2e_request_latency_seconds", "From submission to the last token of a finished sequence",
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
REQUEST_QUEUE = Histogram(
    "moemesh_request_queue_seconds", "Time a sequence waited for admission to the running batch",
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
RUNNING = Gauge("moemesh_num_requests_running", "Sequences in the running batch")
WAITING = Gauge("moemesh_num_requests_waiting", "Sequences waiting for admission")
PROMPT_TOKENS = Counter("moemesh_prompt_tokens", "Prompt tokens of finished sequences")
GENERATED_TOKENS = Counter("moemesh_generation_tokens", "Tokens generated")
REQUESTS = Counter("moemesh_requests", "Gateway calls by method and final gRPC status code", ["method", "code"])
KV_CACHE_BYTES = Gauge("moemesh_kv_cache_usage_bytes", "Bytes of KV cache held by the running sequences")
PREEMPTIONS = Counter("moemesh_num_preemptions", "Sequences whose KV cache was freed for others' (recomputed later)")
SESSION_KV_HIT_TOKENS = Counter("moemesh_session_kv_hit_tokens", "Chat prompt tokens whose KV came from Redis")
SESSION_KV_MISS_TOKENS = Counter("moemesh_session_kv_miss_tokens", "Chat prompt tokens computed afresh")
STEP_SECONDS = Histogram("moemesh_gateway_step_seconds", "Wall time of one engine step")  # bench/throughput.py
