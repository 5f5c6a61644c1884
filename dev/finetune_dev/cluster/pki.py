"""Keys and certificates for the embedded control plane: a CA, the API server's serving certificate
(valid for 127.0.0.1 and the in-cluster `kubernetes` names), the service-account signing key and a
static admin token; for the node, a token of its own (user system:node:NAME, group system:nodes, which
the Node authorizer knows) and the API server's client certificate for the kubelet's API (logs, exec).
Generated once per cluster folder and kept, so a restarted cluster keeps them."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from finetune_dev.cluster.errors import ClusterError

ADMIN_USER = "admin"
ADMIN_GROUP = "system:masters"  # bound to cluster-admin by RBAC's bootstrap policy
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # first address of the range: the `kubernetes` Service
SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
VALIDITY = datetime.timedelta(days=3650)
NODE_NAME = "local-node"
NODE_USER = f"system:node:{NODE_NAME}"
NODE_GROUP = "system:nodes"
KUBELET_CLIENT_CN = "kube-apiserver-kubelet-client"


@dataclass(frozen=True)
class Pki:
    """Paths of the generated files inside one cluster's pki folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.folder / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.folder / "apiserver.key"

    @property
    def service_account_key(self) -> Path:
        return self.folder / "sa.key"

    @property
    def service_account_public_key(self) -> Path:
        return self.folder / "sa.pub"

    @property
    def token_file(self) -> Path:
        return self.folder / "tokens.csv"

    @property
    def admin_token(self) -> str:
        return self.token_file.read_text().split(",", 1)[0]

    @property
    def node_token(self) -> str:
        return next(line for line in self.token_file.read_text().splitlines() if f",{NODE_USER}," in line).split(",")[0]

    @property
    def kubelet_client_cert(self) -> Path:
        return self.folder / "kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> Path:
        return self.folder / "kubelet-client.key"


def ensure_pki(folder: Path) -> Pki:
    """Create the CA, serving certificate, service-account keys and admin token unless they exist."""
    pki = Pki(folder)
    if not pki.token_file.exists():
        _create(pki)
    _add_node_credentials(pki)
    return pki


def _create(pki: Pki) -> None:
    folder = pki.folder
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _certificate("finetune-embedded-ca", ca_key, ca_key, None, is_ca=True)
    serving_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    serving_cert = _certificate("kube-apiserver", serving_key, ca_key, ca_cert, is_ca=False)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    _write_private(pki.ca_key, _private_pem(ca_key))
    pki.ca_cert.write_bytes(_cert_pem(ca_cert))
    _write_private(pki.serving_key, _private_pem(serving_key))
    pki.serving_cert.write_bytes(_cert_pem(serving_cert))
    _write_private(pki.service_account_key, _private_pem(sa_key))
    pki.service_account_public_key.write_bytes(_public_pem(sa_key))
    # Written last: its presence marks the folder complete.
    _write_private(pki.token_file, f'{secrets.token_hex(24)},{ADMIN_USER},{ADMIN_USER},"{ADMIN_GROUP}"\n'.encode())


def _add_node_credentials(pki: Pki) -> None:
    """The node's token and the API server's kubelet-client certificate (also into an older cluster folder)."""
    if not pki.kubelet_client_cert.exists():
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, rsa.RSAPrivateKey):
            raise ClusterError(f"{pki.ca_key} is not the RSA key this cluster made: remove the cluster folder")
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _certificate(KUBELET_CLIENT_CN, key, ca_key, ca_cert, is_ca=False, client_of=ADMIN_GROUP)
        _write_private(pki.kubelet_client_key, _private_pem(key))
        pki.kubelet_client_cert.write_bytes(_cert_pem(cert))
    tokens = pki.token_file.read_text()
    if f",{NODE_USER}," not in tokens:
        _write_private(
            pki.token_file, (tokens + f'{secrets.token_hex(24)},{NODE_USER},{NODE_USER},"{NODE_GROUP}"\n').encode()
        )


def _certificate(
    common_name: str,
    key: rsa.RSAPrivateKey,
    signing_key: rsa.RSAPrivateKey,
    issuer_cert: x509.Certificate | None,
    *,
    is_ca: bool,
    client_of: str | None = None,
) -> x509.Certificate:
    """A CA, a serving certificate, or (client_of: the organization, i.e. the group) a client certificate."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    if client_of:
        subject = x509.Name([*subject, x509.NameAttribute(NameOID.ORGANIZATION_NAME, client_of)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif client_of:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    else:
        names = [x509.DNSName(name) for name in SERVING_DNS_NAMES] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", KUBERNETES_SERVICE_IP)
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data)
