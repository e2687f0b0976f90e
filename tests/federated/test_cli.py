"""``l2-fl`` without Flower or a daemon: help on every command, missing files as usage errors (exit 2, argparse's
message, no traceback), and ``l2-fl dev``'s progress on stderr with its result alone on stdout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from federated import cli, launch
from federated.recorder import JsonlRecorder, Participant, RoundCommitment

JOB = "ab" * 32


def test_every_command_and_argument_has_help(undocumented: Callable[[Any], list[str]]) -> None:
    assert undocumented(cli.build_parser()) == []


@pytest.mark.parametrize("argv", [
    ["join", "--superlink", "127.0.0.1:9", "--data", "{missing}"],
    ["join", "--superlink", "127.0.0.1:9", "--data", "{empty}"],  # a directory without partition.npz
    ["join", "--superlink", "127.0.0.1:9", "--data", "{notnpz}"],
    ["join", "--superlink", "127.0.0.1:9", "--data", "{empty}", "--key", "{missing}"],
    ["join", "--superlink", "127.0.0.1:9", "--data", "{empty}", "--root-certificates", "{missing}"],
    ["keygen", "{missing}/node.key"],
    ["partition", "--out", "{tmp}/p", "--id", "3", "--num", "3"],
    ["post", "--node", "http://127.0.0.1:9", "--key", "{missing}", "--pool", "1000", "--rounds", "2", "--min", "1",
     "--max", "2"],
    ["register", "--node", "http://127.0.0.1:9", "--key", "{missing}", "--job", JOB, "--node-key", "{notnpz}"],
    ["register", "--node", "http://127.0.0.1:9", "--key", "{notnpz}", "--job", JOB, "--node-key", "{missing}"],
    ["reclaim", "--node", "http://127.0.0.1:9", "--key", "{missing}", "--job", JOB],
    ["coordinate", "--node", "http://127.0.0.1:9", "--token-file", "{missing}", "--job", JOB, "--out", "{tmp}/co"],
])
def test_a_missing_or_unusable_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     argv: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.npz").write_text("not a partition\n")
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty", notnpz=tmp_path / "data.npz",
                     tmp=tmp_path) for a in argv]
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith(f"usage: l2-fl {argv[0]}") and f"l2-fl {argv[0]}: error: argument " in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "co").exists()


def test_join_names_what_is_wrong_with_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["join", "--superlink", "127.0.0.1:9", "--data", str(tmp_path / "nope")]) == 2
    assert f"argument --data: no such file or directory: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert cli.main(["join", "--superlink", "127.0.0.1:9", "--data", str(tmp_path)]) == 2
    assert f"no partition.npz in {tmp_path} (write one with l2-fl partition" in capsys.readouterr().err


def test_dev_reports_progress_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The launcher's steps are stood in for (no Flower): what l2-fl dev says about each, and that stdout holds
    only its result."""
    runs: list[dict[str, Any]] = []

    def start_superlink(self: launch.Federation) -> None:
        self.port = 40001

    def add_supernode(self: launch.Federation, node_config: dict[str, Any], *_: Any, **__: Any) -> launch.Proc:
        assert self.workdir is not None
        return launch.Proc(f"supernode-{node_config['partition-id']}", None,  # type: ignore[arg-type]
                           self.workdir / f"supernode-{node_config['partition-id']}.log")

    def run(self: launch.Federation, cfg: dict[str, Any], timeout: float = 300) -> None:
        runs.append(cfg)
        rec = JsonlRecorder(Path(cfg["out-dir"]) / "rounds.jsonl")
        for r in range(1, cfg["num-rounds"] + 1):
            rec.record(RoundCommitment(JOB, r, f"{r:02d}" * 32, f"{r - 1:02d}" * 32, "fedavg",
                                       (Participant(1, 50, True), Participant(2, 50, r == 1, "" if r == 1 else "krum")),
                                       {"accuracy": 0.5 + r / 10}))

    monkeypatch.setattr(launch.Federation, "start_superlink", start_superlink)
    monkeypatch.setattr(launch.Federation, "add_supernode", add_supernode)
    monkeypatch.setattr(launch.Federation, "run", run)
    monkeypatch.setattr(launch.data, "write_partition", lambda path, *_: Path(path))
    out_dir = tmp_path / "dev"
    assert cli.main(["dev", "--nodes", "2", "--rounds", "2", "--out", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"out_dir": str(out_dir / "job")} and len(out.splitlines()) == 1
    assert runs[0]["num-rounds"] == 2 and runs[0]["min-nodes"] == 2
    assert err.splitlines() == [
        f"l2-fl dev: starting the SuperLink (work dir {out_dir})",
        "l2-fl dev: SuperLink listening on 127.0.0.1:40001",
        f"l2-fl dev: started SuperNode 1/2 (partition 0, log {out_dir / 'supernode-0.log'})",
        f"l2-fl dev: started SuperNode 2/2 (partition 1, log {out_dir / 'supernode-1.log'})",
        f"l2-fl dev: running the job: 2 rounds of 2 nodes (rounds are committed to "
        f"{out_dir / 'job' / 'rounds.jsonl'})",
        f"l2-fl dev: round 1/2 committed: accuracy 0.6000, 2/2 participants accepted, params {'01' * 8}",
        f"l2-fl dev: round 2/2 committed: accuracy 0.7000, 1/2 participants accepted, params {'02' * 8}",
        "l2-fl dev: job finished; stopping the SuperNodes and the SuperLink",
    ]
    # a second run in the same --out reports only its own rounds (the job resumes: no new round here)
    monkeypatch.setattr(launch.Federation, "run", lambda self, cfg, timeout=300: None)
    assert cli.main(["dev", "--nodes", "2", "--rounds", "2", "--out", str(out_dir)]) == 0
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("l2-fl dev: round ")] == []


def test_join_with_a_job_stops_its_supernode_once_the_job_is_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A SuperNode left alone retries its SuperLink forever after the job ended: with --job/--node, join follows the
    job on the L2 and stops the SuperNode (here a stand-in that records its start and waits) when it is FINISHED."""
    import http.server
    import json as json_
    import threading

    from federated import cli as fl_cli

    assert fl_cli.main(["partition", "--out", str(tmp_path / "data"), "--id", "0", "--num", "2"]) == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flower-supernode"
    fake.write_text(f"#!/bin/sh\necho started > {tmp_path / 'supernode.started'}\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(fl_cli, "BIN", bin_dir)
    job = "ab" * 32
    answers = iter(["OPEN", "OPEN", "FINISHED"])

    class Node(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status = next(answers, "FINISHED") if self.path == f"/api/fl/jobs/{job}" else None
            body = json_.dumps({"job_id": job, "status": status}).encode()
            self.send_response(200 if status else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc = fl_cli.main(["join", "--superlink", "127.0.0.1:9", "--insecure", "--data", str(tmp_path / "data"),
                          "--job", job, "--node", f"http://127.0.0.1:{server.server_address[1]}", "--poll-s", "0.05"])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0 and (tmp_path / "supernode.started").exists()
    assert f"job {job} is FINISHED on the L2: stopping the SuperNode" in capsys.readouterr().err
    assert next(answers, None) is None  # it asked until the job was over
    assert fl_cli.main(["join", "--superlink", "127.0.0.1:9", "--insecure", "--data", str(tmp_path / "data"),
                        "--job", job]) == 2  # --job without --node
