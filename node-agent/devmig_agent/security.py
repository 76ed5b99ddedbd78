"""Mutual TLS for the agent's gRPC API.

The chart mounts a directory with ``ca.crt``, ``tls.crt`` and ``tls.key``
(a kubernetes.io/tls Secret plus the CA). The agent serves only to clients
whose certificate the CA signed: the operator, and peer agents.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib

import grpc


class TlsConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> TlsFiles:
        d = pathlib.Path(directory)
        parts = {}
        for name in ("ca.crt", "tls.crt", "tls.key"):
            try:
                parts[name] = (d / name).read_bytes()
            except OSError as e:
                raise TlsConfigError(f"cannot read {d / name}: {e.strerror}") from e
        return cls(parts["ca.crt"], parts["tls.crt"], parts["tls.key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
