"""The checkpoint's chat template, rendered exactly as `transformers`' `apply_chat_template(..., tokenize=False)`.

`transformers` is not imported at runtime: this module rebuilds the same jinja2 environment as
`transformers.utils.chat_template_utils._cached_compile_jinja_template` (sandboxed, `trim_blocks`,
`lstrip_blocks`, `loopcontrols`, the `{% generation %}` tag, `raise_exception`, `strftime_now`, the
non-escaping `tojson`, the restricted `dict` and `namespace`) and passes the same variables: `messages`,
`tools`, `documents`, `add_generation_prompt` and the named special tokens (`bos_token`, `eos_token`, ...)
as strings. Templates come from untrusted checkpoints, hence the sandbox.
"""

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from moemesh.errors import CheckpointError, InvalidArgument

# Names a message's reasoning may come under; `transformers` copies it to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]):
        self.source = source
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"chat template: {e}") from e

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ChatTemplate | None":
        """The template of a Hugging Face tokenizer directory, or None when it has none.

        `chat_template.jinja` (as `transformers` 5 saves it) wins over `tokenizer_config.json`'s
        `chat_template`, which is a string or a list of `{name, template}` whose "default" is used.
        """
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.exists():
            source: Any = jinja_file.read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
        if isinstance(source, list):
            named = {t["name"]: t["template"] for t in source}
            if "default" not in named:
                raise CheckpointError(f"chat templates {sorted(named)} in {model_dir} have no 'default'")
            source = named["default"]
        if not source:
            return None
        return cls(source, special_tokens(model_dir, config))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template error (e.g. `raise_exception` on roles that do not
        alternate) is the caller's bad input: InvalidArgument."""
        if not messages:
            raise InvalidArgument("messages: the conversation is empty")
        try:
            return self._template.render(
                messages=[_normalize(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise InvalidArgument(f"messages: {e}") from e


def special_tokens(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens `transformers` hands to the template, as `tokenizer_config.json` states them.

    Every `*_token` entry (`bos_token`, `eos_token`, ..., or a model's own like `image_token`) and a dict
    `extra_special_tokens` are named tokens. A legacy `special_tokens_map.json` overrides the config, but
    only when the config has no `added_tokens_decoder` (as in `transformers`). Defaults that a tokenizer
    class would fill in for names the files leave out are not reproduced.
    """
    tokens = {k: c for k, v in config.items() if k.endswith("_token") and (c := _token_content(v)) is not None}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: c for k, v in extra.items() if (c := _token_content(v)) is not None})
    legacy = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.exists():
        for key, value in _read_json(legacy).items():
            if key.endswith("_token") and (content := _token_content(value)) is not None:
                tokens[key] = content
    return tokens


def eos_token_ids(model_dir: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every id that ends generation: `generation_config.json`'s `eos_token_id`, then `config.json`'s
    (or its `text_config`'s), then `tokenizer_config.json`'s `eos_token`; deduplicated, in that order.

    Chat models often end a turn with a token other than the config's EOS (Qwen's `<|im_end|>`), so
    all three sources count.
    """
    model_dir = Path(model_dir)
    ids: list[int] = []
    config = _read_json(model_dir / "config.json")
    for value in (
        _read_json(model_dir / "generation_config.json").get("eos_token_id"),
        config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id")),
    ):
        ids.extend([value] if isinstance(value, int) else value or [])
    eos = _token_content(_read_json(model_dir / "tokenizer_config.json").get("eos_token"))
    if eos is not None and (token_id := tokenizer.token_to_id(eos)) is not None:
        ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def _token_content(value: Any) -> str | None:
    """A token given as a string or as a serialized `AddedToken` ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _normalize(message: Mapping[str, Any]) -> dict[str, Any]:
    """As `transformers` does: None values dropped, reasoning also under `reasoning_content` and `thinking`."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: `transformers` uses it to mask assistant tokens; the
    text renders unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """Unlike jinja2's own `tojson`, does not HTML-escape."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without the attributes of the `dict` type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]  # jinja2's signature trick, so that `namespace(self=...)` works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env
