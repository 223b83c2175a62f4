"""Certificates, keys and kubeconfigs for the local control plane (``cryptography``, ECDSA P-256).

Two CAs, as a real cluster has: the cluster CA signs the API server's serving certificate and every
client certificate (admin, controller-manager, scheduler, kwok); the webhook CA stands in for
cert-manager and signs the KServe webhook server's certificate for 127.0.0.1, and is the ``caBundle``
of the webhook configurations. ServiceAccount tokens are signed with their own key pair.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=30)
# the first address of --service-cluster-ip-range: the `kubernetes` Service
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        + [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


class CA:
    def __init__(self, cn: str):
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        cn: str,
        *,
        orgs: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        client: bool = False,
    ) -> tuple[bytes, bytes]:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, orgs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    apiserver: Pair
    sa_key: Path
    sa_pub: Path
    webhook_ca: Path
    webhook: Pair
    clients: dict[str, Pair]  # identity -> client certificate


# identity -> (CN, organizations). system:kube-controller-manager and system:kube-scheduler are the
# users the default RBAC bootstrap policy binds; kwok writes node and pod status of every namespace, which
# no narrower built-in role grants, so it is a cluster admin like the test's own identity.
IDENTITIES = {
    "admin": ("mlrollout-admin", ("system:masters",)),
    "controller-manager": ("system:kube-controller-manager", ()),
    "scheduler": ("system:kube-scheduler", ()),
    "kwok": ("kwok-controller", ("system:masters",)),
}


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = CA("mlrollout-controlplane-ca")
    _write(folder / "ca.crt", ca.pem(), 0o644)
    crt, key = ca.issue(
        "kube-apiserver",
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", KUBERNETES_SERVICE_IP),
        server=True,
    )
    apiserver = Pair(_write(folder / "apiserver.crt", crt, 0o644), _write(folder / "apiserver.key", key))
    clients = {}
    for ident, (cn, orgs) in IDENTITIES.items():
        crt, key = ca.issue(cn, orgs=orgs, client=True)
        clients[ident] = Pair(
            _write(folder / f"{ident}.crt", crt, 0o644), _write(folder / f"{ident}.key", key)
        )
    sa = _key()
    _write(folder / "sa.key", _pem_key(sa))
    _write(
        folder / "sa.pub",
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    wca = CA("mlrollout-webhook-ca")
    _write(folder / "webhook-ca.crt", wca.pem(), 0o644)
    crt, key = wca.issue("kserve-webhook-server", dns=("localhost",), ips=("127.0.0.1",), server=True)
    webhook = Pair(_write(folder / "webhook.crt", crt, 0o644), _write(folder / "webhook.key", key))
    return PKI(
        folder,
        folder / "ca.crt",
        apiserver,
        folder / "sa.key",
        folder / "sa.pub",
        folder / "webhook-ca.crt",
        webhook,
        clients,
    )


def kubeconfig(
    server: str, ca: Path, *, user: str, cert: Pair | None = None, token: str | None = None
) -> str:
    """A one-context kubeconfig; credentials embedded so the file can be copied around."""
    cred: dict[str, str] = {}
    if cert:
        cred = {"client-certificate": str(cert.cert), "client-key": str(cert.key)}
    if token:
        cred = {"token": token}
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "mlrollout-controlplane",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [{"name": user, "user": cred}],
        "contexts": [{"name": user, "context": {"cluster": "mlrollout-controlplane", "user": user}}],
        "current-context": user,
    }
    return yaml.safe_dump(doc, sort_keys=False)
