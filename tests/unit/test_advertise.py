"""An expert replica's announced address: its bind address, or for a wildcard bind its host name's IP (so that
the replicas of a scaled container service announce distinct, reachable addresses)."""

import socket

import pytest

from moemesh.registry import advertised_address


@pytest.mark.timeout(10)
def test_a_specific_bind_address_is_announced_as_is():
    assert advertised_address("10.1.2.3", 7001) == "10.1.2.3:7001"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_bind_announces_the_host_names_address(monkeypatch, host):
    monkeypatch.setattr(socket, "gethostname", lambda: "expert-p0-3")
    monkeypatch.setattr(socket, "gethostbyname", {"expert-p0-3": "172.18.0.7"}.__getitem__)
    assert advertised_address(host, 7001) == "172.18.0.7:7001"
