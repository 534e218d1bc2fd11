"""Server TLS for the gRPC services: one way to listen, plaintext or TLS (optionally mutual)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path  # PEM certificate chain
    key_file: Path  # PEM private key
    client_ca_file: Path | None = None  # set: clients must present a certificate signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials([(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)


def tls_from_args(cert: str | None, key: str | None, client_ca: str | None = None) -> TlsConfig | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return TlsConfig(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def listen(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Binds `address` and returns the port; raises OSError when it can't."""
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def add_tls_arguments(parser) -> None:
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS instead of plaintext")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: require client certificates signed by it (mutual TLS)")
