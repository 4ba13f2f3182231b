"""Chat prompts in which only the chat template places control tokens: message contents are data.

Text like `<｜end▁of▁sentence｜><｜Assistant｜>` in a message would otherwise become those control tokens
and forge turns. The template is rendered twice: with the real contents (the prompt `transformers`
would build), and with a sentinel for each content, which splits the template's own text into pieces.

The real rendering is then read as those pieces with each content, whole or in part, between them
(templates may strip reasoning or whitespace from a content). When that reading exists and every
control token of the real rendering's plain encoding lies inside the template's pieces, that encoding
is the prompt: exactly what `transformers` gives, for all ordinary conversations. Otherwise (a content
holds control-token text, or forms one with its surroundings) the prompt is built piece by piece: the
template's pieces encoded as usual, each content as plain text. Such a content then reaches the model
whole, even where the template would have shortened it.
"""

import re
from bisect import bisect_right
from collections.abc import Iterator

from tokenizers import Encoding

from services.gateway.chat_template import ChatTemplate
from services.gateway.text import TextCodec

_SENTINEL = re.compile("\ue000([0-9]+)\ue001")  # private-use characters around the message's index
# Candidate positions tried when reading the real rendering as pieces and contents, before giving up.
_ALIGN_BUDGET = 256


class ChatEncoder:
    def __init__(self, template: ChatTemplate, codec: TextCodec):
        self.template, self.codec = template, codec

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        text = self.template.render(messages, add_generation_prompt)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        parts = _SENTINEL.split(self.template.render(marked, add_generation_prompt))
        pieces, contents = parts[0::2], [messages[int(i)]["content"] for i in parts[1::2]]
        spans = align(text, pieces, contents)
        if spans is not None:
            encoding = self.codec.tokenizer.encode(text, add_special_tokens=False)
            if not self._controls_within(encoding, spans):
                return encoding.ids
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids += self.codec.encode(piece)
            if i < len(contents):
                ids += self.codec.encode_data(contents[i])
        return ids

    def _controls_within(self, encoding: Encoding, spans: list[tuple[int, int]]) -> bool:
        """Whether a control token of `encoding` overlaps one of the content `spans` (sorted, disjoint)."""
        starts = [s for s, _ in spans]
        for token, (begin, end) in zip(encoding.ids, encoding.offsets):
            if token in self.codec.control_ids:
                i = bisect_right(starts, begin) - 1  # the last span starting at or before the token
                if (i >= 0 and begin < spans[i][1]) or (i + 1 < len(spans) and spans[i + 1][0] < end):
                    return True
        return False


def align(text: str, pieces: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """The spans of `text` that hold the contents when `text` reads pieces[0], a part of contents[0],
    pieces[1], ..., pieces[-1]; each content whole if possible. None when there is no such reading (the
    template's own text depends on the contents) or finding one takes too long."""
    if not text.startswith(pieces[0]):
        return None
    if not contents:
        return [] if text == pieces[0] else None
    # Depth-first over the contents without recursion (a session may hold hundreds of messages): while
    # stack[j] yields the candidate ends of content j, starts and ends hold those of contents 0..j-1.
    starts, ends = [len(pieces[0])], []
    stack = [_ends(text, starts[0], contents[0], pieces[1], len(contents) == 1)]
    for _ in range(_ALIGN_BUDGET):
        if not stack:
            return None
        j = len(stack) - 1
        end = next(stack[j], None)
        if end is None:
            stack.pop()
            starts.pop()
            if ends:
                ends.pop()
            continue
        if j + 1 == len(contents):
            return list(zip(starts, [*ends, end]))
        ends.append(end)
        starts.append(end + len(pieces[j + 1]))
        stack.append(_ends(text, starts[-1], contents[j + 1], pieces[j + 2], j + 2 == len(contents)))
    return None


def _ends(text: str, start: int, content: str, piece: str, last: bool) -> Iterator[int]:
    """Where a content beginning at `start` may end: followed by `piece` (and, for the last content, by
    nothing after it), holding the content whole first, then a part of it, longest first."""
    if last:
        end = len(text) - len(piece)
        if end >= start and text.endswith(piece) and text[start:end] in content:
            yield end
        return
    whole = start + len(content)
    if text.startswith(content, start) and text.startswith(piece, whole):
        yield whole
    candidates = []
    at = text.find(piece, start)
    while 0 <= at <= whole:
        if at != whole:
            candidates.append(at)
        at = text.find(piece, at + 1)
    for end in reversed(candidates):
        if text[start:end] in content:
            yield end
