"""Tokenizer and streaming detokenization with stop strings."""

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    """The checkpoint's `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TextCodec | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.exists() else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns generated ids into text deltas: never half a UTF-8 character, never part of a stop string.

    Text that could still become a stop string is held back until it cannot; once a stop string
    appears, the text ends just before it.
    """

    def __init__(self, codec: TextCodec | None, stop: tuple[str, ...]):
        self.codec, self.stop = codec, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def add(self, token: int) -> tuple[str, bool]:
        """Returns (new text, whether a stop string was hit)."""
        if self.codec is None:
            return "", False
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            return self._emit(text, max(end, self.emitted)), True
        if text.endswith("\ufffd"):  # a character whose remaining bytes come with the next token
            return "", False
        return self._emit(text, len(text) - self._held_back(text)), False

    def flush(self) -> str:
        """The rest of the text when generation ends for another reason than a stop string."""
        if self.codec is None:
            return ""
        text = self.codec.decode(self.ids)
        return self._emit(text, len(text))

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
