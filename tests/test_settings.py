"""Settings come from flags, then `MOEMESH_*` environment variables, then defaults."""

import argparse

import pytest
from pydantic import ValidationError

from moemesh.settings import GatewaySettings, RouterSettings, add_flags, from_flags


def parse(settings_cls, argv):
    parser = argparse.ArgumentParser()
    add_flags(parser, settings_cls)
    return from_flags(settings_cls, parser.parse_args(argv))


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("MOEMESH_MODEL", "/models/env")
    monkeypatch.setenv("MOEMESH_MAX_BATCH_TOKENS", "256")
    settings = parse(GatewaySettings, ["--max-batch-tokens", "128", "--dtype", "bfloat16"])
    assert str(settings.model) == "/models/env"
    assert settings.max_batch_tokens == 128
    assert settings.dtype == "bfloat16"
    assert settings.max_batch_seqs == GatewaySettings.model_fields["max_batch_seqs"].default


def test_list_flags_are_comma_separated():
    settings = parse(RouterSettings, ["--model", "/m", "--experts", "127.0.0.1:1,127.0.0.1:2"])
    assert settings.experts == ["127.0.0.1:1", "127.0.0.1:2"]


def test_bad_values_are_rejected_with_the_field_name():
    with pytest.raises(SystemExit):
        parse(GatewaySettings, ["--model", "/m", "--dtype", "int4"])
    with pytest.raises(ValidationError, match="max_batch_tokens"):
        parse(GatewaySettings, ["--model", "/m", "--max-batch-tokens", "many"])
