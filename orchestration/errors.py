"""Typed exceptions of the orchestration subsystem (worker table and scheduler)."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class OrchestrationError(Exception):
    """Base class of every orchestration error."""


class InvalidWorker(OrchestrationError, ValueError):
    """A worker record (or an update to one) is malformed; the message names the field."""


class DuplicateWorker(OrchestrationError, KeyError):
    """A worker with this id is already registered."""


class UnknownWorker(OrchestrationError, KeyError):
    """No worker with this id is registered."""


class SchedulerError(OrchestrationError):
    """Base class of scheduler errors."""


class InvalidWeights(SchedulerError, ValueError):
    """Scoring weights are malformed; the message names the offending weight and value."""


class InvalidRequirements(SchedulerError, ValueError):
    """Task requirements are malformed; the message names the field."""


class NoEligibleWorker(SchedulerError):
    """No registered worker passes the hard filters of a task.

    ``filter_name`` is the filter that eliminated the last remaining candidates,
    ``eliminated`` maps every filter (in evaluation order) to how many workers it removed,
    ``registered`` is the table size.
    """

    def __init__(self, filter_name: str, eliminated: dict[str, int], registered: int) -> None:
        self.filter_name = filter_name
        self.eliminated = dict(eliminated)
        self.registered = registered
        detail = ", ".join(f"{k}={v}" for k, v in eliminated.items())
        super().__init__(
            f"no eligible worker: filter {filter_name!r} eliminated the last candidates "
            f"({registered} registered; eliminated per filter: {detail})"
        )
