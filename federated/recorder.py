"""The round-commitment seam between the Flower ServerApp and the L2 ledger.

The ServerApp calls ``RoundRecorder.record(RoundCommitment)`` once per completed round,
after the new global parameters are checkpointed. ``JsonlRecorder`` appends one JSON line per
round to a file; ``federated.l2.L2Recorder`` commits the round to the L2 ledger (an FL_ROUND
in the state tree; rewards for the accepted participants at the job's finish).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Participant:
    """One participant's part in a round."""

    node_id: int
    num_examples: int
    accepted: bool
    reason: str = ""  # why not accepted ("" when accepted)
    update_bytes: int = 0  # bytes of the update as sent (after compression)


@dataclass(frozen=True)
class RoundCommitment:
    """What a round commits to: the new global parameters and who contributed."""

    job_id: str
    round: int
    params_hash: str  # SHA-256 hex of federated.model.canonical_bytes(new global params)
    prev_params_hash: str
    strategy: str
    participants: tuple[Participant, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["participants"] = [asdict(p) for p in self.participants]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(line: str) -> "RoundCommitment":
        d = json.loads(line)
        d["participants"] = tuple(Participant(**p) for p in d["participants"])
        return RoundCommitment(**d)


class RoundRecorder(Protocol):
    """Where round commitments go (a JSONL file, or the L2 ledger)."""

    def record(self, commitment: RoundCommitment) -> None: ...

    def last(self, job_id: str) -> RoundCommitment | None:
        """The last committed round of a job, for resume."""
        ...


class JsonlRecorder:
    """Appends one JSON line per round; fsyncs so a crash never loses a committed round."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def record(self, commitment: RoundCommitment) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(commitment.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def all(self, job_id: str | None = None) -> list[RoundCommitment]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                c = RoundCommitment.from_json(line)
            except (ValueError, TypeError, KeyError):
                continue  # a torn last line from a crash is not a commitment
            if job_id is None or c.job_id == job_id:
                out.append(c)
        return out

    def last(self, job_id: str) -> RoundCommitment | None:
        rounds = self.all(job_id)
        return max(rounds, key=lambda c: c.round) if rounds else None
