"""The Flower side of the L2 integration (over the daemon's REST API, l2d.client): the L2 RoundRecorder, and the
registration bridge that turns a job's L2 registrations into the SuperLink's node allow-list.

Flow (docs/federated.md):
  1. A poster signs FL_JOB_POST (reward pool escrowed); participants sign FL_REGISTER with the OpenSSH public
     key of the Flower node key they will join with (``l2-fl post`` / ``l2-fl register``).
  2. The coordinator (federation) reads the job's registrations from the daemon and registers exactly those
     node keys with its auth-enabled SuperLink (``sync_registrations``), recording which Flower node id
     belongs to which L2 key. A SuperNode whose key is not registered on the L2 is refused by Flower.
  3. The ServerApp records each round with ``L2Recorder``: it uploads the aggregated parameters to the
     daemon's content-addressed model store, asks the daemon to commit the round (an FL_ROUND signed with the
     federation key), and waits until the commitment is in a block. After the last round it asks for the
     finish (FL_FINISH with the contribution split the ledger computes).
  4. Resume: ``L2Recorder.last`` reads the last committed round from the L2; its parameters come from the
     local checkpoint or, when that is gone, from the daemon's model store (checked against the hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from federated.launch import Federation, LaunchError
from federated.recorder import JsonlRecorder, RoundCommitment
from federated.tls import ServerTls, hostport
from l2d.client import ApiError, Client
from l2d.core.fl_tx import FlJobPost, FlReclaim, FlRegister

log = logging.getLogger(__name__)

PPM = 1_000_000


def fixed_point(x: float, scale: int = PPM) -> int:
    """A non-negative float metric as an integer (parts per million by default); NaN and negatives are 0."""
    if not x == x or x <= 0:  # NaN or non-positive
        return 0
    return min(int(round(x * scale)), 2**64 - 1)


class L2Recorder:
    """RoundRecorder that commits each round to the L2 (and keeps the float metrics in a local JSONL file).

    node_map: Flower node id -> L2 key (hex), from ``sync_registrations``. A participant missing from the map
    could only be a node the SuperLink let in without an L2 registration: refuse to commit rather than guess.
    """

    def __init__(self, api: Client, job_id: str, node_map: dict[int, str], checkpoints: Path,
                 local: JsonlRecorder | None = None, commit_timeout: float = 60.0,
                 node_map_path: Path | None = None) -> None:
        self.api = api
        self.job_id = job_id
        self.node_map = node_map
        self.node_map_path = node_map_path  # re-read when a node is missing (registered after the run began)
        self.checkpoints = checkpoints
        self.local = local
        self.commit_timeout = commit_timeout

    def record(self, c: RoundCommitment) -> None:
        if c.job_id != self.job_id:
            raise ValueError(f"commitment for job {c.job_id}, recorder is for {self.job_id}")
        raw = (self.checkpoints / f"{c.params_hash}.params").read_bytes()
        if self.api.put_model(raw) != c.params_hash:
            raise ApiError(500, "hash-mismatch", "the daemon stored the model under another hash")
        parts = []
        if self.node_map_path is not None and any(p.node_id not in self.node_map for p in c.participants):
            self.node_map = read_node_map(self.node_map_path)
        for p in c.participants:
            key = self.node_map.get(p.node_id)
            if key is None:
                raise ApiError(403, "unregistered", f"Flower node {p.node_id} has no L2 registration for the job")
            parts.append({"key": key, "num_examples": int(p.num_examples),
                          "accepted": bool(p.accepted)})
        m = c.metrics
        body = {"round": c.round, "params_hash": c.params_hash, "prev_params_hash": c.prev_params_hash,
                "accuracy_ppm": min(fixed_point(float(m.get("accuracy", 0.0))), PPM),
                "loss_ppm": fixed_point(float(m.get("loss", 0.0))),
                "update_bytes": int(m.get("update_bytes", 0.0)),
                "dp_epsilon_ppm": fixed_point(float(m.get("dp_epsilon", 0.0))), "participants": parts}
        try:
            self.api.fl_round(self.job_id, body)
        except ApiError as e:
            if e.code != "duplicate-duty":
                raise
            log.info("round %d of L2 job %s is committed already", c.round, self.job_id)  # a retry: wait, below
        self.api.wait(lambda: self.api.fl_job(self.job_id)["rounds_done"] >= c.round,
                      f"round {c.round} of job {self.job_id} in a block", self.commit_timeout)
        if self.local is not None:
            self.local.record(c)
        log.info("round %d of L2 job %s committed (params %s)", c.round, self.job_id, c.params_hash)

    def last(self, job_id: str) -> RoundCommitment | None:
        j = self.api.fl_job(job_id)
        n = int(j["rounds_done"])
        if n == 0:
            return None
        r = j["rounds_detail"][-1]
        ckpt = self.checkpoints / f"{r['params_hash']}.params"
        if not ckpt.exists():  # the coordinator lost its disk: the daemon serves what the L2 committed to
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(self.api.get_model(r["params_hash"]))
            log.info("checkpoint %s fetched from the L2 model store", r["params_hash"])
        return RoundCommitment(job_id=job_id, round=n, params_hash=r["params_hash"],
                               prev_params_hash=r["prev_params_hash"], strategy="", participants=(),
                               metrics={"accuracy": r["metrics"]["accuracy_ppm"] / PPM})

    def finish(self, job_id: str) -> dict[str, Any]:
        """Close the job on the L2 (rewards by contribution) unless it is closed already; returns the job."""
        j = self.api.fl_job(job_id)
        if j["status"] != "OPEN" or j["rounds_done"] < j["rounds"]:  # closed, or rounds still to run
            return j
        try:
            self.api.fl_finish(job_id)
        except ApiError as e:
            if e.code != "duplicate-duty":  # duplicate-duty: finished meanwhile; the wait below returns it
                raise
        return dict(self.api.wait(lambda: (lambda j: j if j["status"] != "OPEN" else None)(self.api.fl_job(job_id)),
                                  f"job {job_id} finished", self.commit_timeout))


def recorder_from_config(cfg: dict[str, Any], out: Path) -> L2Recorder | None:
    """The L2 recorder a run config asks for (l2-url set), else None."""
    url = str(cfg.get("l2-url") or "")
    if not url:
        return None
    token_file = str(cfg.get("l2-token-file") or "")
    token = Path(token_file).read_text().strip() if token_file else ""
    node_map_path = Path(str(cfg.get("l2-node-map") or (out / "node-map.json")))
    return L2Recorder(Client(url, token), str(cfg["job-id"]), read_node_map(node_map_path), out / "checkpoints",
                      JsonlRecorder(out / "rounds.jsonl"), node_map_path=node_map_path)


def read_node_map(path: Path) -> dict[int, str]:
    return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}


def sync_registrations(fed: Any, api: Client, job_id: str, node_map_path: Path) -> dict[int, str]:
    """Register with the SuperLink exactly the node keys registered on the L2 for job_id (and not yet registered
    with this SuperLink); write and return the Flower node id -> L2 key map."""
    job = api.fl_job(job_id)
    known: dict[int, str] = read_node_map(node_map_path) if node_map_path.exists() else {}
    have = set(known.values())
    for p in job["participants"]:
        if p["key"] in have:
            continue
        pub = Path(fed.workdir) / f"l2-{p['key'][:16]}.pub"
        pub.write_text(p["node_key"] + "\n")
        known[fed.register(pub)] = p["key"]
    node_map_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = node_map_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(known.items())}, sort_keys=True))
    os.replace(tmp, node_map_path)  # the ServerApp may read it at any time
    return known


def coordinate(api: Client, job_id: str, out: Path, settings: dict[str, Any], token_file: Path,
               say: Any = log.info, poll: float = 1.0, on_ready: Any = None,
               status_every: float = 10.0, host: str = "127.0.0.1", port: int = 0, tls: ServerTls | None = None,
               advertise: str = "") -> dict[str, Any]:
    """Run (or resume) an L2 job as the federation: an auth SuperLink whose allow-list follows the job's L2
    registrations, one Flower run committing every round, until the job is FINISHED on the L2.

    host/port: where the SuperLink listens (port 0: a free one); tls: the operator's certificate, key and CA
    (checked by the caller, federated.tls.check_server_tls), else a throwaway CA for 127.0.0.1; advertise: the host
    participants dial (default host), only for the join line printed.

    on_ready(federation) is called once the SuperLink is up and the registered keys are allowed (tests use it
    to start participants)."""
    job = api.fl_job(job_id)
    if job["status"] != "OPEN":  # FINISHED, or RECLAIMED by its poster
        return job
    if config_hash(settings).hex() != job["config_hash"]:
        raise ValueError(f"these settings hash to {config_hash(settings).hex()}, the job was posted with "
                         f"{job['config_hash']}: pass the same --set values as the poster")
    api.check_admin()  # the ServerApp commits rounds with this token: refuse a wrong one before starting Flower
    out.mkdir(parents=True, exist_ok=True)
    fed = Federation(workdir=out / f"fed-{time.time_ns()}", auth=True, host=host, port=port, tls=tls)
    try:
        fed.start_superlink()
        node_map = Path(str(fed.workdir)) / "node-map.json"
        sync_registrations(fed, api, job_id, node_map)
        where = hostport(advertise or host, fed.port)
        say(f"SuperLink on {hostport(host, fed.port)}; participants join with: l2-fl join --superlink {where} "
            f"--root-certificates {fed.ca} --key NODE_KEY --data DIR")
        if on_ready is not None:
            on_ready(fed)
        cfg = {**settings, "job-id": job_id, "out-dir": str(out / "job"), "num-rounds": int(job["rounds"]),
               "min-nodes": int(job["min_participants"]), "l2-url": api.url, "l2-token-file": str(token_file),
               "l2-node-map": str(node_map)}
        run_id = fed.submit_run(cfg)
        next_status = time.monotonic() + status_every
        while True:
            fed._check_alive("superlink")
            job = api.fl_job(job_id)
            if job["status"] != "OPEN":
                return job
            sync_registrations(fed, api, job_id, node_map)
            if time.monotonic() >= next_status:  # `flwr ls` is a process start: not every poll
                st = fed.run_status(run_id)
                if st.startswith("finished"):
                    job = api.fl_job(job_id)
                    if job["status"] != "OPEN":
                        return job
                    raise LaunchError(f"Flower run {run_id} ended ({st}) with the job still open after round "
                                      f"{job['rounds_done']}; logs in {fed.workdir}. Run coordinate again to resume.")
                next_status = time.monotonic() + status_every
            time.sleep(poll)
    finally:
        fed.cleanup()


def config_hash(run_config: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of the training settings a job fixes (posted on the L2 with the job)."""
    keep = {k: v for k, v in run_config.items() if not k.startswith("l2-") and k not in ("out-dir", "job-id")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()).digest()


def post_job(api: Client, secret: bytes, pool_sat: int, run_config: dict[str, Any], rounds: int,
             min_participants: int, max_participants: int, fee_sat: int = 1) -> str:
    """Sign and submit an FL_JOB_POST escrowing pool_sat; returns the job id (its txid, hex)."""
    payload = FlJobPost(pool_sat, config_hash(run_config), rounds, min_participants, max_participants)
    return str(api.sign_and_submit(secret, payload, fee_sat)["txid"])


def reclaim_job(api: Client, secret: bytes, job_id: str, fee_sat: int = 1) -> str:
    """Sign and submit an FL_RECLAIM (the poster closes a job idle for RECLAIM_BLOCKS blocks)."""
    return str(api.sign_and_submit(secret, FlReclaim(bytes.fromhex(job_id)), fee_sat)["txid"])


def register_participant(api: Client, secret: bytes, job_id: str, node_public_key: str, fee_sat: int = 1) -> str:
    """Sign and submit an FL_REGISTER of the sender's L2 key with its Flower node's OpenSSH public key line."""
    line = node_public_key.strip()
    return str(api.sign_and_submit(secret, FlRegister(bytes.fromhex(job_id), line.encode()), fee_sat)["txid"])
