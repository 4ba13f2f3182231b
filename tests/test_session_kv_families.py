"""The session KV store on a sliding-window model (only the window is stored) and on MLA (the latent)."""

import pytest

from moemesh.checkpoint import Checkpoint
from moemesh.demo_model import write_tokenizer
from moemesh.settings import GatewaySettings
from services.gateway.requests import GenerationRequest, Limits, SamplingConfig, merge
from services.gateway.server import build_engine, conversations
from tests.family_checkpoints import deepseek_v3
from tests.helpers import DEEPSEEK_VOCAB, make_mixtral

pytestmark = pytest.mark.integration

SYSTEM = "Answer briefly and politely. " * 20


def window_model(path):
    return make_mixtral(path, tokenizer=True, sliding_window=48, seed=7)


def mla_model(path):
    deepseek_v3(path, vocab_size=DEEPSEEK_VOCAB)
    write_tokenizer(path)
    return path


@pytest.mark.parametrize("make", [window_model, mla_model], ids=["sliding-window", "mla"])
def test_turn_on_a_second_engine_equals_recompute(make, tmp_path, redis_server):
    model_dir = make(tmp_path / "model")
    settings = GatewaySettings(model=model_dir, dtype="float32", redis=redis_server.url, kv_chunk_tokens=16)
    engines = [build_engine(settings)[0] for _ in range(2)]  # two gateways' engines, one Redis
    cfg = Checkpoint(model_dir).config
    limits = Limits(
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        default_max_new_tokens=8,
        max_new_tokens_limit=64,
    )
    first, second = (conversations(settings, e, Checkpoint(model_dir), limits) for e in engines)
    for engine in engines:
        engine.start()
    try:

        def turn(conv, session, *messages):
            from moemesh.v1 import gateway_pb2

            pb = [gateway_pb2.Message(role=r, content=c) for r, c in messages]
            outputs = list(conv.turn(session, pb, gateway_pb2.SamplingParams(max_new_tokens=8), "me", lambda _: None))
            return merge(outputs)

        one = turn(first, "", ("system", SYSTEM), ("user", "Where is my order?"))
        two = turn(second, one.session_id, ("user", "And the invoice?"))
        history = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": one.text},
            {"role": "user", "content": "And the invoice?"},
        ]
        prompt = engines[0].text.encode(first.template.render(history, add_generation_prompt=True))
        seq = engines[0].submit(GenerationRequest(prompt, SamplingConfig(max_new_tokens=8)))
        assert two.token_ids == merge(list(seq.outputs())).token_ids
        assert two.cached_tokens >= one.prompt_tokens - 16

        stored = {int(k.split(b":")[-1]) for k in redis_server.client().keys(f"moemesh:session:{one.session_id}:kv:*")
                  if not k.endswith(b":meta")}  # fmt: skip
        needed = -(-(one.prompt_tokens + 8) // 16)  # chunks covering the whole conversation so far
        if cfg.sliding_window:
            assert 0 not in stored and len(stored) < needed  # only the chunks the window still sees
        else:
            assert stored == set(range(len(stored))) and len(stored) >= needed - 2
    finally:
        for engine in engines:
            engine.stop()


def test_session_limits(tmp_path, redis_server, mixtral_dir):
    from moemesh.errors import ResourceExhausted
    from moemesh.v1 import gateway_pb2

    settings = GatewaySettings(
        model=mixtral_dir, dtype="float32", redis=redis_server.url, max_session_turns=1, max_session_tokens=200
    )
    engine = build_engine(settings)[0]
    cfg = Checkpoint(mixtral_dir).config
    conv = conversations(
        settings,
        engine,
        Checkpoint(mixtral_dir),
        Limits(vocab_size=cfg.vocab_size, max_context=512, default_max_new_tokens=8, max_new_tokens_limit=64),
    )
    engine.start()
    try:

        def turn(session, text):
            message = [gateway_pb2.Message(role="user", content=text)]
            sampling = gateway_pb2.SamplingParams(max_new_tokens=4)
            return merge(list(conv.turn(session, message, sampling, "me", lambda _: None)))

        session = turn("", "Hi").session_id
        with pytest.raises(ResourceExhausted, match="reached its limit of 1 turns"):
            turn(session, "Again")
        with pytest.raises(ResourceExhausted, match="over the session limit of 200"):
            turn("", "word " * 300)
    finally:
        engine.stop()
