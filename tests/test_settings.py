"""Settings come from flags, then `MOEMESH_*` environment variables, then defaults."""

import argparse
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from moemesh.errors import ConfigError
from moemesh.settings import ExpertSettings, GatewaySettings, RouterSettings, add_flags, describe, from_flags


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


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1"])
@pytest.mark.parametrize("settings_cls", [GatewaySettings, RouterSettings, ExpertSettings])
def test_device_from_flags_and_environment(monkeypatch, settings_cls, name):
    assert parse(settings_cls, ["--model", "/m", "--device", name]).device == name
    monkeypatch.setenv("MOEMESH_DEVICE", name)
    assert parse(settings_cls, ["--model", "/m"]).device == name
    monkeypatch.delenv("MOEMESH_DEVICE")
    assert parse(settings_cls, ["--model", "/m"]).device == "auto"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:0,1", ""])
def test_a_bad_device_is_rejected_with_what_is_expected(name):
    with pytest.raises(ValidationError, match=r"device\n.*is not a device: expected auto, cpu, cuda or cuda:N") as info:
        parse(GatewaySettings, ["--model", "/m", "--device", name])
    assert describe(info.value) == f"device: {name!r} is not a device: expected auto, cpu, cuda or cuda:N"


def test_device_auto_resolves_to_the_cpu_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse(ExpertSettings, ["--model", "/m"]).torch_device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="device: cuda requested, but torch .* sees no CUDA device"):
        parse(ExpertSettings, ["--model", "/m", "--device", "cuda"]).torch_device()


def test_tls_files_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("MOEMESH_TLS_CA", "/certs/ca.pem")
    settings = parse(RouterSettings, ["--model", "/m", "--tls-cert", "/certs/cert.pem", "--tls-key", "/certs/key.pem"])
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == tuple(
        Path(f"/certs/{name}.pem") for name in ("cert", "key", "ca")
    )


@pytest.mark.parametrize(
    ("settings_cls", "argv", "message"),
    [
        (GatewaySettings, ["--tls-cert", "/c.pem"], "tls_cert and tls_key: set both or neither"),
        (GatewaySettings, ["--tls-ca", "/ca.pem"], "tls_ca turns on mutual TLS, which needs tls_cert and tls_key"),
        (RouterSettings, ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"], "routers and experts serve mutual TLS only"),
        (ExpertSettings, ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"], "routers and experts serve mutual TLS only"),
    ],
)
def test_incomplete_tls_settings_are_rejected(settings_cls, argv, message):
    with pytest.raises(ValidationError, match=message):
        parse(settings_cls, ["--model", "/m", *argv])


def test_gateway_may_serve_tls_without_internal_mutual_tls():
    settings = parse(GatewaySettings, ["--model", "/m", "--tls-cert", "/c.pem", "--tls-key", "/k.pem"])
    assert settings.tls_ca is None


def test_a_missing_tls_file_fails_at_start_naming_the_setting(tmp_path):
    settings = parse(GatewaySettings, ["--model", "/m", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", "/k"])
    with pytest.raises(ConfigError, match=r"tls_cert: cannot read .*c\.pem \(No such file or directory\)"):
        settings.tls()


def test_a_gateway_reaches_the_experts_through_routers_or_a_registry_not_both():
    with pytest.raises(ValidationError, match="router and registry: set one"):
        parse(GatewaySettings, ["--model", "/m", "--router", "127.0.0.1:1", "--registry", "redis://127.0.0.1:2/0"])
    assert parse(GatewaySettings, ["--model", "/m", "--registry", "redis://127.0.0.1:2/0"]).router is None
