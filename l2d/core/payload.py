"""What every transaction payload module builds on: the type numbers and the payload interface.

The payload classes live one module per subsystem (coin_tx, anchor_tx, pegs_tx, work_tx, fl_tx, session_tx,
relay_tx, model_tx); l2d/core/tx.py maps each TxType to its class in one static table.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Protocol

from .errors import DecodeError, OutOfRange
from .params import MAX_MONEY


class TxType(IntEnum):
    """Every transaction type number, in one place so none is ever reused.

    Ranges: 1-15 ledger, anchoring and bridge; 16-31 orchestration (workers, tasks); 32-47 federated learning;
    48-63 paid sessions and the NetFlow relay mesh; 64-79 inference (models, offers).
    The payload classes of a subsystem live in its own module (l2d/core/<subsystem>_tx.py), its state
    transitions in another (l2d/core/<subsystem>.py); l2d/core/tx.py (PAYLOAD_TYPES) and l2d/core/rules.py
    (RULES) map every type to both.
    """

    TRANSFER = 1
    MINT = 2
    BURN = 3
    ANCHOR = 4
    PEGIN_CLAIM = 5
    PEGOUT_UPDATE = 6
    BTC_HEADERS = 7
    FEDERATION_FUND = 8
    PEGOUT_PLAN = 9
    PLAN_SIGNATURE = 10
    ROLL_PLAN = 11
    PLAN_COMPLETED = 12
    ANCHOR_PLAN = 13
    WORKER_REGISTER = 16
    WORKER_HEARTBEAT = 17
    WORKER_EXIT = 18
    WORKER_WITHDRAW = 19
    TASK_SUBMIT = 20
    TASK_ASSIGN = 21
    TASK_RESULT = 22
    TASK_REASSIGN = 23
    TASK_SETTLE = 24
    TASK_DISPUTE = 25
    TASK_RESOLVE = 26
    TASK_CANCEL = 27
    FL_JOB_POST = 32
    FL_REGISTER = 33
    FL_ROUND = 34
    FL_FINISH = 35
    FL_RECLAIM = 36
    SESSION_OPEN = 48
    SESSION_SETTLE = 49
    SESSION_CLOSE = 50
    RELAY_REGISTER = 51
    RELAY_HEARTBEAT = 52
    RELAY_EXIT = 53
    RELAY_WITHDRAW = 54
    RELAY_WEIGHTS = 55
    MODEL_REGISTER = 64
    MODEL_SERVE = 65
    COMPLETION = 66
    COMPLETION_CHALLENGE = 67
    COMPLETION_REFEREE = 68



def check_amount(amount: int, what: str) -> None:
    if not 0 < amount <= MAX_MONEY:
        raise OutOfRange(f"{what} {amount} is outside 1..{MAX_MONEY}")



@dataclass(frozen=True, slots=True)
class EmptyPayload:
    """The base of payloads with no fields (the sender and the nonce say everything): heartbeats, exits..."""

    FEELESS: ClassVar[bool] = False

    def encode(self) -> bytes:
        return b""

    def debit_sat(self) -> int:
        return 0

    @staticmethod
    def check_empty(b: bytes, what: str) -> None:
        if b:
            raise DecodeError(f"{what} payload is {len(b)} bytes, expected 0")


class Payload(Protocol):
    TYPE: ClassVar[TxType]
    # True for types posted by an authority (mint, anchor, relay...): they carry fee 0 and no fee floor applies.
    FEELESS: ClassVar[bool]

    def encode(self) -> bytes: ...

    def debit_sat(self) -> int:
        """What the transaction takes from its sender's balance besides the fee (0 if nothing)."""
        ...



class PayloadClass(Protocol):
    """What the decoder needs of a payload class: its type number and its strict decode."""

    @property
    def TYPE(self) -> TxType: ...

    def decode(self, b: bytes) -> Payload: ...

