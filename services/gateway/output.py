"""The output processor: turns a sampled token into what the caller sees. It detokenizes (holding back text a
stop string or the output rules may still claim), ends the sequence at end-of-sequence, a stop string, the
output rules or `max_new_tokens`, and records the token's metrics. It never touches the batch."""

import time

from services.gateway import metrics
from services.gateway.requests import StepOutput
from services.gateway.sequence import Sequence


class OutputProcessor:
    def __init__(self, eos_ids: tuple[int, ...]):
        self.eos_ids = set(eos_ids)

    def process(self, seq: Sequence, token: int, logprob: float) -> StepOutput | None:
        """The output for `seq`'s new token (its last one when `finish_reason` is set: the engine then has the
        scheduler finish it); None when everything new is held back by the output rules."""
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.submitted_at)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.trace is not None:
            seq.trace.sampled(len(seq.output_ids))
        out = StepOutput()
        if token in self.eos_ids and not seq.sampling.ignore_eos:
            out.text, filtered = seq.text.flush(eos=token)
            out.finish_reason = filtered or "eos"
        else:
            out.text, out.finish_reason = seq.text.add(token)
            if not out.finish_reason and len(seq.output_ids) >= seq.sampling.max_new_tokens:
                rest, filtered = seq.text.flush()
                out.text += rest
                out.finish_reason = filtered or "length"
        released = seq.text.released  # tokens whose text has been sent (all of them without output rules)
        out.token_ids = seq.output_ids[seq.sent : released]
        if seq.sampling.return_logprobs:
            out.logprobs = seq.logprobs[seq.sent : released]
        seq.sent = released
        if out.finish_reason:
            out.prompt_tokens, out.completion_tokens = len(seq.prompt_ids), len(seq.output_ids)
            out.cached_tokens = seq.cached
            metrics.E2E_REQUEST_LATENCY.observe(now - seq.submitted_at)
            metrics.PROMPT_TOKENS.inc(len(seq.prompt_ids))
            return out
        if not out.token_ids and not out.text:
            return None
        return out
