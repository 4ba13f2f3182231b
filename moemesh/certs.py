"""`moemesh certs DIR`: a development CA and one certificate that every service uses.

DIR gets `ca.pem` (the CA's certificate), `cert.pem` (a certificate the CA signed, for both server and client
authentication, with SANs `localhost`, `127.0.0.1` and any names given) and `key.pem` (its private key, mode
0600). The CA's own key is not written: nothing else can be signed by it later, so a leaked directory cannot
mint identities; make a new directory instead. EC P-256 keys, valid for a year.
"""

import datetime
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moemesh.errors import ConfigError

LOOPBACK_NAMES = ("localhost", "127.0.0.1")
VALID_DAYS = 365
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now, for hosts whose clocks lag


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> "CertFiles":
        return cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")

    def __iter__(self) -> Iterator[Path]:
        return iter((self.ca, self.cert, self.key))


def make(directory: Path, names: list[str] | tuple[str, ...] = ()) -> CertFiles:
    """Writes a new CA and a certificate for `localhost`, `127.0.0.1` and `names` (DNS names or IP addresses)
    into `directory`; refuses to overwrite any of the files."""
    files = CertFiles.in_dir(directory)
    if existing := [path for path in files if path.exists()]:
        raise ConfigError(f"{existing[0]} exists: remove it or choose another directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _service_certificate(key, ca_cert, ca_key, [*LOOPBACK_NAMES, *names])
    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(files.key, key_pem, 0o600)
    return files


def ensure(directory: Path) -> CertFiles:
    """The certificates in `directory`, made first if it has none."""
    files = CertFiles.in_dir(directory)
    if all(path.exists() for path in files):
        return files
    return make(directory)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moemesh development CA")])
    public = key.public_key()
    return (
        _validity(x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _service_certificate(
    key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str]
) -> x509.Certificate:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moemesh")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _validity(builder)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in dict.fromkeys(names)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` with `mode` from the start (a key is never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        f.write(data)
