"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1 and a client one.

Made with the ``openssl`` command (the ``cryptography`` package is not a dependency), EC P-256 keys,
unencrypted, valid for a day.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hydra_otel.demo.sandbox.receiver import ServerTls


@dataclass(frozen=True, slots=True)
class Certs:
    """PEM files: the CA, the server's pair and the client's pair (both signed by the CA)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server(self, *, require_client: bool) -> ServerTls:
        """The receivers' TLS, asking for a client certificate signed by the CA if ``require_client``."""
        return ServerTls(
            certificate=self.server_cert, key=self.server_key, client_ca=self.ca if require_client else None
        )


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _signed(
    directory: Path, name: str, subject: str, extensions: str, ca: Path, ca_key: Path
) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{suffix}" for suffix in ("-key.pem", ".csr", ".pem", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", subject)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
             "-out", cert, "-extfile", ext)  # fmt: skip
    return cert, key


def make_certs(directory: Path) -> Certs:
    """Write a CA, a server certificate (127.0.0.1, localhost) and a client certificate to ``directory``.

    Skips the test when there is no ``openssl`` command.
    """
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=hydra-otel test CA")  # fmt: skip
    server = _signed(directory, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                     "extendedKeyUsage=serverAuth\n", ca, ca_key)  # fmt: skip
    client = _signed(directory, "client", "/CN=hydra-otel", "extendedKeyUsage=clientAuth\n", ca, ca_key)
    return Certs(
        ca=ca, server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1]
    )
