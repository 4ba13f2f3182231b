"""The shipped demo bot, served by `moemesh up` as `make demo` serves it: on-topic greedy replies to
held-out customer questions, a follow-up answered from the earlier turn, and parity with `transformers`."""

import pytest
from tokenizers import Tokenizer

from moemesh import demo_model
from moemesh.demo_bot import heldout
from moemesh.demo_bot.tokenizer import turn_text
from moemesh.v1 import gateway_pb2
from tests.helpers import Cluster, hf_greedy, stepwise_logits
from tests.test_parity import local_moe

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 64


@pytest.fixture(scope="module")
def bot():
    cluster = Cluster(demo_model.bot_dir())  # as `moemesh up` without --model, Redis included
    yield cluster.stub
    cluster.close()


def chat(stub, session_id: str, question: str) -> tuple[str, str]:
    """One greedy turn; (session id, reply)."""
    request = gateway_pb2.ChatRequest(
        session_id=session_id,
        messages=[gateway_pb2.Message(role="user", content=question)],
        sampling=gateway_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),
    )
    parts = list(stub.Chat(request, timeout=60))
    assert parts[-1].finish_reason == "eos", "the reply did not end its turn"
    return parts[0].session_id, "".join(p.text for p in parts)


@pytest.mark.timeout(300)
def test_held_out_questions_get_on_topic_replies(bot):
    misses = []
    for question, keywords in heldout.HELD_OUT:
        _, reply = chat(bot, "", question)
        if not heldout.on_topic(reply, keywords):
            misses.append((question, reply))
    assert len(misses) <= 2, misses


@pytest.mark.timeout(300)
def test_a_follow_up_is_answered_from_the_earlier_turn(bot):
    first, second, keywords = heldout.TWO_TURNS
    session, reply = chat(bot, "", first)
    assert "refund" in reply.lower(), reply
    _, reply = chat(bot, session, second)
    assert all(k in reply.lower() for k in keywords), reply


@pytest.mark.timeout(120)
def test_greedy_tokens_match_transformers():
    model_dir = demo_model.bot_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    question = {"role": "user", "content": heldout.HELD_OUT[0][0]}
    prompt = tokenizer.encode(turn_text(question) + "<|assistant|>", add_special_tokens=False).ids
    theirs, _ = hf_greedy(model_dir, prompt, 24)  # stops after the end-of-turn token
    ours, _ = stepwise_logits(model_dir, local_moe, prompt, 24)
    assert len(theirs) > 4 and ours[: len(theirs)] == theirs
