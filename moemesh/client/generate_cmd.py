"""`moemesh generate`: one streamed reply on stdout (used by `make demo`)."""

import sys
from pathlib import Path

from moemesh.client.sync import Client
from moemesh.errors import MoemeshError


def stream_generate(
    address: str, prompt: str, max_new_tokens: int, temperature: float, ca: Path | None, api_key: str | None = None
) -> int:
    """Streams one reply to stdout; with `ca`, over TLS verifying the gateway against it."""
    with Client(address, tls_ca=ca, api_key=api_key, timeout_s=300) as client:
        try:
            for chunk in client.generate_stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason and chunk.usage is not None:
                    print(f"\n[finish_reason={chunk.finish_reason} prompt_tokens={chunk.usage.prompt_tokens} "
                          f"completion_tokens={chunk.usage.completion_tokens}]")  # fmt: skip
        except MoemeshError as exc:
            print(f"\nmoemesh generate: {exc.code.name}: {exc}", file=sys.stderr)
            return 1
    return 0
