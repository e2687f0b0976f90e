"""The operator's TLS for a SuperLink across machines (federated/tls.py), without Flower, a daemon or namespaces:
``l2-fl coordinate --bind/--tls-*`` refuses unusable TLS files as usage errors before anything starts, and ``l2-fl
join`` names a certificate that does not cover the address it dials instead of leaving it to gRPC retries."""
from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from federated import cli, tls

JOB = "ab" * 32


def _coordinate(tmp_path: Path, *extra: str) -> list[str]:
    token = tmp_path / "token"
    token.write_text("x" * 32 + "\n")
    # port 9 (discard): nothing is contacted, every refusal below comes before the daemon is asked anything
    return ["coordinate", "--node", "http://127.0.0.1:9", "--token-file", str(token), "--job", JOB,
            "--out", str(tmp_path / "co"), *extra]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], tmp_path: Path) -> str:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith(f"usage: l2-fl {argv[0]}") and f"l2-fl {argv[0]}: error: argument " in err, err
    assert not (tmp_path / "co").exists()  # nothing started, nothing written
    return err


def test_coordinate_refuses_incomplete_or_mismatched_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         pki: Callable[..., Any]) -> None:
    ca, cert, key = pki(tmp_path / "lan", ["10.231.7.10"])
    ca2, cert2, key2 = pki(tmp_path / "other", ["10.231.7.10"], ca_name="another CA")
    lan = ["--bind", "10.231.7.10"]

    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(cert)), tmp_path)
    assert "argument --tls-cert: the operator's TLS needs --tls-cert, --tls-key and --tls-ca together " \
           "(missing --tls-ca, --tls-key)" in err
    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-key", str(key), "--tls-ca", str(ca)), tmp_path)
    assert "(missing --tls-cert)" in err
    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(cert), "--tls-key", str(key),
                                           "--tls-ca", str(tmp_path / "missing.crt")), tmp_path)
    assert f"argument --tls-ca: no such file: {tmp_path / 'missing.crt'}" in err

    # the certificate must name the address clients dial: here 127.0.0.1, the default bind
    err = _usage_error(capsys, _coordinate(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                                           "--tls-ca", str(ca)), tmp_path)
    assert (f"argument --tls-cert: {cert} does not name 127.0.0.1, which clients dial (its subjectAltName: "
            "10.231.7.10)") in err
    err = _usage_error(capsys, _coordinate(tmp_path, "--bind", "10.231.7.11", "--tls-cert", str(cert),
                                           "--tls-key", str(key), "--tls-ca", str(ca)), tmp_path)
    assert "does not name 10.231.7.11" in err

    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(cert), "--tls-key", str(key2),
                                           "--tls-ca", str(ca)), tmp_path)
    assert f"argument --tls-key: {key2} is not the private key of --tls-cert {cert}" in err
    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(cert), "--tls-key", str(key),
                                           "--tls-ca", str(ca2)), tmp_path)
    assert f"argument --tls-cert: {cert} is not signed by --tls-ca {ca2}" in err
    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(cert), "--tls-key", str(key),
                                           "--tls-ca", str(cert)), tmp_path)
    assert f"argument --tls-ca: {cert} is not a CA certificate" in err
    err = _usage_error(capsys, _coordinate(tmp_path, *lan, "--tls-cert", str(key), "--tls-key", str(key),
                                           "--tls-ca", str(ca)), tmp_path)
    assert f"argument --tls-cert: {key} is not a PEM certificate" in err

    # off loopback the throwaway CA (127.0.0.1 only) cannot serve: the operator's files are required
    err = _usage_error(capsys, _coordinate(tmp_path, *lan), tmp_path)
    assert "argument --bind: 10.231.7.10 needs the operator's --tls-cert, --tls-key and --tls-ca" in err
    err = _usage_error(capsys, _coordinate(tmp_path, "--bind", "superlink.example"), tmp_path)
    assert "argument --bind: 'superlink.example' is not an IP address" in err


def test_check_server_tls_accepts_matching_files_and_reads_names(tmp_path: Path, pki: Callable[..., Any]) -> None:
    ca, cert, key = pki(tmp_path, ["10.231.7.10", "fl.example.org", "*.lan.example.org"])
    files = tls.ServerTls(ca, cert, key)
    assert tls.check_server_tls(files, ["10.231.7.10", "fl.example.org", "a.lan.example.org"]) == [
        "fl.example.org", "*.lan.example.org", "10.231.7.10"]
    for host in ("10.231.7.1", "example.org", "a.b.lan.example.org", "lan.example.org", "::1"):
        with pytest.raises(tls.TlsError, match=f"does not name {host}"):
            tls.check_server_tls(files, [host])
    # bound to all addresses, the coordinator's own clients dial loopback: the certificate must name it as well
    assert tls.dial_host("0.0.0.0") == "127.0.0.1" and tls.dial_host("::") == "::1"
    assert tls.dial_host("10.231.7.10") == "10.231.7.10"


class _TlsServer:
    """A one-connection TLS server on loopback presenting a certificate (what a SuperLink's handshake shows)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        try:
            with self.ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client refused our certificate

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


def test_join_names_a_certificate_that_does_not_cover_the_superlink_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: Callable[..., Any]) -> None:
    from federated import data

    part = data.write_partition(tmp_path / "data" / "partition.npz", 0, 2)
    ca, cert, key = pki(tmp_path / "pki", ["10.231.7.10"])  # not 127.0.0.1, which join dials below
    server = _TlsServer(cert, key)
    try:
        assert cli.main(["join", "--superlink", f"127.0.0.1:{server.port}", "--data", str(part.parent),
                         "--root-certificates", str(ca)]) == 1
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert (f"l2-fl join: the SuperLink at 127.0.0.1:{server.port} presented a certificate that "
            f"--root-certificates {ca} does not accept for 127.0.0.1: IP address mismatch") in err

    ca_ok, cert_ok, key_ok = pki(tmp_path / "ok", ["127.0.0.1"], ca_name="another operator's CA")
    server = _TlsServer(cert_ok, key_ok)
    try:
        assert tls.probe(f"127.0.0.1:{server.port}", ca_ok) is None  # verified: join goes on to start Flower
    finally:
        server.close()
    server = _TlsServer(cert_ok, key_ok)
    try:
        with pytest.raises(tls.TlsError, match="does not accept for 127.0.0.1: unable to get local issuer certificate"):
            tls.probe(f"127.0.0.1:{server.port}", ca)  # another operator's CA
    finally:
        server.close()

    # a --root-certificates that is no CA, and a --superlink that is no HOST:PORT, are usage errors
    assert cli.main(["join", "--superlink", "127.0.0.1:9", "--data", str(part.parent),
                     "--root-certificates", str(cert)]) == 2
    assert f"argument --root-certificates: {cert} is not a CA certificate" in capsys.readouterr().err
    assert cli.main(["join", "--superlink", "10.231.7.10", "--data", str(part.parent)]) == 2
    assert "argument --superlink: '10.231.7.10' is not HOST:PORT" in capsys.readouterr().err
