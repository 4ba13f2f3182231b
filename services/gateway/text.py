"""Tokenizer and streaming detokenization with stop strings and the output guard."""

import json
from bisect import bisect_right
from pathlib import Path

from tokenizers import Tokenizer

from services.gateway.content.output_guard import OutputGuard


class TextCodec:
    """The checkpoint's `tokenizer.json`, through the `tokenizers` library.

    Control tokens are the tokenizer's added tokens (`<｜User｜>`, `<|im_start|>`, `<think>`, BOS/EOS...),
    which it matches in text before anything else. Only the chat template's own text may become them:
    text from clients and message contents go through `encode_data`, where their text is plain text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.control_ids = frozenset(tokenizer.get_added_tokens_decoder())
        self._data_tokenizer = _controls_as_text(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TextCodec | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.exists() else None

    def encode(self, text: str) -> list[int]:
        """Trusted text (the chat template's): control-token text becomes control tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_data(self, text: str) -> list[int]:
        """Untrusted text: control-token text is tokenized like any other text. Text without any gives the
        same ids as `encode`."""
        return self._data_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _controls_as_text(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that does not match added tokens in text.

    `encode_special_tokens` makes a tokenizer treat its special tokens as text, but added tokens that are
    not flagged special (DeepSeek's `<｜User｜>` and `<｜Assistant｜>`) would still match, so the copy
    flags every added token special first.
    """
    config = json.loads(tokenizer.to_str())
    for token in config.get("added_tokens", []):
        token["special"] = True
    copy = Tokenizer.from_str(json.dumps(config))
    copy.encode_special_tokens = True
    return copy


CONTEXT_TOKENS = 4  # tokens decoded again before new ones, so that their text comes out as in the whole


class TextStream:
    """Turns generated ids into text deltas: never half a UTF-8 character, never part of a stop string,
    never text an output rule blocks.

    Text that could still become a stop string is held back until it cannot; once a stop string
    appears, the text ends just before it. With an output guard, the end of the text is held back for
    its rules too, and so are the tokens behind it: a token is released (its id and logprob may be sent)
    once all its text has been sent, so that blocked text cannot be read from the ids either. When a rule
    matches, the text ends just before the match (finish reason "filtered").
    """

    def __init__(self, codec: TextCodec | None, stop: tuple[str, ...], guard: OutputGuard | None = None):
        self.codec, self.stop, self.guard = codec, stop, guard
        self.ids: list[int] = []  # tokens with text (not the EOS that ends a generation)
        self.text = ""  # the text of ids[: self._read], decoded for good
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context the next tokens are decoded after
        self.ends: list[int] = []  # for every token: the length of the text once it was added
        self.emitted = 0  # characters of the decoded text already returned
        self.finished = False  # ended without a rule matching: every token is released

    @property
    def released(self) -> int:
        """How many of the tokens so far the client may see."""
        if self.guard is None or self.finished:
            return len(self.ends)
        return bisect_right(self.ends, self.emitted)

    def add(self, token: int) -> tuple[str, str]:
        """Returns (new text, "stop", "filtered" or "" while generation goes on)."""
        if self.codec is None:
            self.ends.append(0)
            return "", ""
        self.ids.append(token)
        text = self._decoded()
        partial = text.endswith("\ufffd")  # a character whose remaining bytes come with the next token
        self.ends.append(len(text) - partial)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if not hits and partial:
            return "", ""
        end = min(hits) if hits else len(text)
        if self.guard is not None:
            end, rule = self.guard.scan(text, self.emitted, end, final=bool(hits))
            if rule is not None:
                return self._emit(text, end), "filtered"
        if hits:
            self.finished = True
            return self._emit(text, max(end, self.emitted)), "stop"
        return self._emit(text, min(end, len(text) - self._held_back(text))), ""

    def flush(self, eos: int | None = None) -> tuple[str, str]:
        """The rest of the text when generation ends for another reason than a stop string (`eos`: the
        token that ended it, which has no text); "filtered" when an output rule matches in it."""
        if eos is not None:
            self.ends.append(self.ends[-1] if self.ends else 0)
        if self.codec is None:
            self.finished = True
            return "", ""
        text = self._decoded()
        if self.guard is not None:
            end, rule = self.guard.scan(text, self.emitted, len(text), final=True)
            if rule is not None:
                return self._emit(text, end), "filtered"
        self.finished = True
        return self._emit(text, len(text)), ""

    def _decoded(self) -> str:
        """The text of all ids so far, decoding only the tokens since the last complete character after a
        few tokens of context (a token's text may depend on the one before it: SentencePiece's leading
        space, byte pieces), as TGI and vLLM do; decoding everything every token would be quadratic."""
        context = self.codec.decode(self.ids[self._prefix : self._read])
        window = self.codec.decode(self.ids[self._prefix :])
        text = self.text + window[len(context) :]
        if not window.endswith("\ufffd"):  # whole characters: decoded for good
            self.text = text
            self._prefix, self._read = max(self._prefix, self._read - CONTEXT_TOKENS), len(self.ids)
        return text

    def _emit(self, text: str, end: int) -> str:
        delta = text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text) - self.emitted), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
