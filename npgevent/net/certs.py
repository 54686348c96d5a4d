"""Certificate material for TLS: fingerprints, the tls=1 in-memory certificate, PEM files.

* :func:`fingerprint`: ``sha256:AA:BB:...`` of a certificate, NodePass's verify-log format.
* :func:`self_signed`: the in-memory certificate of ``tls=1`` (ECDSA P-256, one year,
  Organization = the NodePass version, as Go does), built with ``cryptography``.
* :func:`read_pem_file` / :func:`load_pem_pair`: the ``crt``/``key`` files of ``tls=2``, as
  regular files of at most :data:`MAX_PEM` bytes.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import NODEPASS_VERSION

_DER = serialization.Encoding.DER


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:AA:BB:...`` of the DER certificate (NodePass's verify log format)."""
    digest = hashlib.sha256(cert.public_bytes(_DER)).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def self_signed(common_name: str = "") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODEPASS_VERSION)]
    if common_name:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    name = x509.Name(attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert, key


MAX_PEM = 1 << 20  # bytes: a certificate chain or key file is a few KiB


def read_pem_file(path: str) -> bytes:
    """A regular file of at most :data:`MAX_PEM` bytes.  ``/dev/zero`` (endless), a FIFO (would
    block start-up) or a directory is an OSError naming what was expected."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_PEM:
            raise OSError(errno.EFBIG, "larger than %d KiB" % (MAX_PEM >> 10))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_PEM + 1)
        if len(data) > MAX_PEM:  # grew while we read
            raise OSError(errno.EFBIG, "larger than %d KiB" % (MAX_PEM >> 10))
        return data
    finally:
        os.close(fd)


def load_pem_pair(crt: str, key: str) -> tuple[x509.Certificate, Any]:
    cert = x509.load_pem_x509_certificate(read_pem_file(crt))
    pkey = serialization.load_pem_private_key(read_pem_file(key), password=None)
    return cert, pkey


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
