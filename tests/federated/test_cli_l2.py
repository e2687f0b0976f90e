"""``l2-fl post / register / coordinate`` against the session's real daemon: clear errors that change nothing."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from federated import cli
from federated.launch import generate_node_key


def _key_file(tmp_path: Path, label: str) -> Path:
    p = tmp_path / f"{label}.l2key"
    p.write_text(hashlib.sha256(b"fl test " + label.encode()).hexdigest() + "\n")  # conftest._secret
    return p


def test_post_register_and_coordinate_refusals(daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = _key_file(tmp_path, "cli")
    url = daemon.url
    # settings the ServerApp could not run are refused before anything is signed
    assert cli.main(["post", "--node", url, "--key", str(key), "--pool", "1000", "--rounds", "2", "--min", "1",
                     "--max", "2", "--set", "strategy=nope"]) == 1
    assert "strategy must be one of" in capsys.readouterr().err
    assert cli.main(["post", "--node", url, "--key", str(tmp_path / "missing"), "--pool", "1000", "--rounds", "2",
                     "--min", "1", "--max", "2"]) == 2  # a usage error, before anything is signed
    assert f"argument --key: no such file: {tmp_path / 'missing'}" in capsys.readouterr().err
    unreadable = tmp_path / "not-a-key"
    unreadable.write_text("not hex\n")
    assert cli.main(["post", "--node", url, "--key", str(unreadable), "--pool", "1000", "--rounds", "2",
                     "--min", "1", "--max", "2"]) == 1
    assert "must hold a valid secp256k1 secret" in capsys.readouterr().err
    assert cli.main(["post", "--node", url, "--key", str(key), "--pool", "1000", "--rounds", "2", "--min", "3",
                     "--max", "2"]) == 1
    assert "participants need 1 <= min" in capsys.readouterr().err
    assert cli.main(["post", "--node", url, "--key", str(key), "--pool", str(100 * 1_000_000), "--rounds", "2",
                     "--min", "1", "--max", "2"]) == 1
    assert "insufficient-balance" in capsys.readouterr().err
    assert cli.main(["post", "--node", url, "--key", str(key), "--pool", "1000", "--rounds", "2", "--min", "1",
                     "--max", "2", "--set", "strategy=krum", "--set", "local-epochs=2"]) == 0
    import json

    jid = json.loads(capsys.readouterr().out)["job_id"]
    daemon.api.wait(lambda: daemon.api.fl_job_or_none(jid), "job posted", 30)
    pub = generate_node_key(tmp_path / "node.key")
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAAB3NzaC1yc2E\n")
    assert cli.main(["register", "--node", url, "--key", str(key), "--job", jid, "--node-key", str(bad)]) == 1
    assert "node key is not an OpenSSH" in capsys.readouterr().err
    assert cli.main(["register", "--node", url, "--key", str(key), "--job", "xyz", "--node-key", str(pub)]) == 1
    assert "--job must be" in capsys.readouterr().err
    assert cli.main(["register", "--node", url, "--key", str(key), "--job", "ab" * 32, "--node-key", str(pub)]) == 1
    assert "no FL job" in capsys.readouterr().err
    assert daemon.api.fl_job(jid)["participants"] == []
    # the poster may reclaim the pool only after RECLAIM_BLOCKS idle blocks; nobody else ever
    assert cli.main(["reclaim", "--node", url, "--key", str(key), "--job", jid]) == 1
    assert "may be reclaimed from height" in capsys.readouterr().err
    assert cli.main(["reclaim", "--node", url, "--key", str(_key_file(tmp_path, "main-poster")), "--job", jid]) == 1
    assert "only the poster" in capsys.readouterr().err
    assert daemon.api.fl_job(jid)["status"] == "OPEN"
    token = tmp_path / "token"
    token.write_text("not-the-admin-token\n")
    assert cli.main(["coordinate", "--node", url, "--token-file", str(token), "--job", jid, "--out",
                     str(tmp_path / "co"), "--set", "strategy=krum", "--set", "local-epochs=2"]) == 1
    assert "admin token rejected" in capsys.readouterr().err
    assert not (tmp_path / "co").exists()
    token.write_text(daemon.token_file.read_text())
    # the coordinator refuses settings other than the ones the job was posted with, before starting Flower
    assert cli.main(["coordinate", "--node", url, "--token-file", str(token), "--job", jid, "--out",
                     str(tmp_path / "co"), "--set", "strategy=fedavg", "--set", "local-epochs=2"]) == 1
    assert "the job was posted with" in capsys.readouterr().err
    assert not (tmp_path / "co").exists()
    assert cli.main(["register", "--node", "http://127.0.0.1:9", "--key", str(key), "--job", jid,
                     "--node-key", str(pub)]) == 1
    assert "l2-fl register:" in capsys.readouterr().err
    assert daemon.api.fl_job(jid)["participants"] == []
    assert cli.main(["register", "--node", url, "--key", str(key), "--job", jid, "--node-key", str(pub)]) == 0
    capsys.readouterr()
    (p,) = daemon.api.wait(lambda: daemon.api.fl_job(jid)["participants"], "registration", 30)
    assert p["node_key"] == pub.read_text().strip()
