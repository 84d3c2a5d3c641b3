"""A throwaway test PKI made with ``openssl``: a CA, certificates it signs (good, for another
host name, expired, a client's), and a second CA nobody trusts.

``make_pki(dir)`` writes the files and returns their paths; the ``pki`` fixture makes one
per session. Skipped with the reason where ``openssl`` is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA every certificate below is signed by (except other_*)
    server_cert: Path  # for localhost and 127.0.0.1
    server_key: Path
    wrong_name_cert: Path  # for elsewhere.invalid only
    wrong_name_key: Path
    expired_cert: Path  # for localhost and 127.0.0.1, no longer valid
    expired_key: Path
    client_cert: Path  # clientAuth, CN=jasper-consumer
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it trusts none of the above
    other_server_cert: Path  # for localhost and 127.0.0.1, signed by other_ca
    other_server_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-500:]}")


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", *_EC, "-days", "30", "-subj", f"/CN={name}", "-keyout",
             f"{name}.key", "-out", f"{name}.pem", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, ca: str, name: str, cn: str, ext: str, days: str = "30") -> None:
    _openssl("req", *_EC, "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", days, "-extfile", f"{name}.ext", "-out",
             f"{name}.pem", cwd=d)


def make_pki(d: Path) -> Pki:
    """Write a test PKI into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "ca", "server", "localhost", server)
    _leaf(d, "ca", "wrong-name", "elsewhere.invalid",
          "subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "ca", "expired", "localhost", server, days="-1")  # not after < now
    _leaf(d, "ca", "client", "jasper-consumer", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "other-ca", "other-server", "localhost", server)
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               wrong_name_cert=d / "wrong-name.pem", wrong_name_key=d / "wrong-name.key",
               expired_cert=d / "expired.pem", expired_key=d / "expired.key",
               client_cert=d / "client.pem", client_key=d / "client.key",
               other_ca=d / "other-ca.pem", other_server_cert=d / "other-server.pem",
               other_server_key=d / "other-server.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no test certificates can be made")
    return make_pki(tmp_path_factory.mktemp("pki"))
