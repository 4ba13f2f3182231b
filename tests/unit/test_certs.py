"""`moemesh certs DIR`: a CA and a certificate for every service, with loopback SANs, that chains to the CA;
`Tls.load` refuses files that are not what their setting names."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from moemesh import certs
from moemesh.cli import main
from moemesh.errors import ConfigError
from moemesh.tls import Tls


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> certs.CertFiles:
    directory = tmp_path_factory.mktemp("certs") / "dev"
    assert main(["certs", str(directory), "--san", "mesh.internal", "--san", "10.0.0.7"]) == 0
    return certs.CertFiles.in_dir(directory)


def load(files: certs.CertFiles) -> tuple[x509.Certificate, x509.Certificate]:
    """The CA's certificate and the services'."""
    return tuple(x509.load_pem_x509_certificate(path.read_bytes()) for path in (files.ca, files.cert))


@pytest.mark.timeout(60)
def test_files_and_permissions(made):
    assert [p.name for p in made] == ["ca.pem", "cert.pem", "key.pem"]
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca.stat().st_mode) == stat.S_IMODE(made.cert.stat().st_mode) == 0o644
    assert not (made.ca.parent / "ca-key.pem").exists() and len(list(made.ca.parent.iterdir())) == 3


@pytest.mark.timeout(60)
def test_certificate_names_loopback_and_the_given_sans(made):
    _, cert = load(made)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "mesh.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.0.7")]


@pytest.mark.timeout(60)
def test_certificate_chains_to_the_ca_for_servers_and_clients(made):
    ca, cert = load(made)
    policy = PolicyBuilder().store(Store([ca]))
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        assert policy.build_server_verifier(name).verify(cert, [])[-1] == ca
    assert policy.build_client_verifier().verify(cert, []).chain[-1] == ca
    key = serialization.load_pem_private_key(made.key.read_bytes(), None)
    assert key.public_key() == cert.public_key()


@pytest.mark.timeout(60)
def test_certificates_of_another_run_do_not_chain_to_this_ca(made, tmp_path):
    ca, _ = load(made)
    _, foreign = load(certs.make(tmp_path / "other"))
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store([ca])).build_client_verifier().verify(foreign, [])


@pytest.mark.timeout(60)
def test_existing_files_are_never_overwritten_and_ensure_reuses_them(made, tmp_path):
    before = [p.read_bytes() for p in made]
    with pytest.raises(ConfigError, match="ca.pem exists"):
        certs.make(made.ca.parent)
    assert certs.ensure(made.ca.parent) == made
    assert [p.read_bytes() for p in made] == before
    fresh = certs.ensure(tmp_path / "fresh")
    assert all(p.exists() for p in fresh)


@pytest.mark.timeout(60)
def test_tls_load_names_the_setting_of_a_wrong_file(made, tmp_path):
    Tls.load(made.cert, made.key, made.ca)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    other = certs.make(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"tls_cert: .*garbage\.pem is not a PEM certificate"):
        Tls.load(garbage, made.key, made.ca)
    with pytest.raises(ConfigError, match=r"tls_key: .*ca\.pem is not an unencrypted PEM private key"):
        Tls.load(made.cert, made.ca, made.ca)
    with pytest.raises(ConfigError, match=r"tls_ca: .*key\.pem is not a PEM certificate"):
        Tls.load(made.cert, made.key, made.key)
    with pytest.raises(ConfigError, match=r"tls_key: .*other/key\.pem is not the private key of tls_cert"):
        Tls.load(made.cert, other.key, made.ca)
