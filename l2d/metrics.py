"""Daemon metrics: counters, gauges and a histogram rendered in the Prometheus text exposition format 0.0.4.

Written by hand (no prometheus_client dependency). Not thread-safe by design: every update runs on the
event loop.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


def escape_label_value(v: str) -> str:
    """Escape a label value as the exposition format requires (backslash, double quote, newline)."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def _fmt_value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


class Counter:
    """A monotonically increasing counter, optionally with labels."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.values: dict[Labels, int] = {}

    def inc(self, n: int = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + n

    def get(self, **labels: str) -> int:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values:
            out.append(f"{self.name} 0")
        for labels, v in sorted(self.values.items()):
            out.append(f"{self.name}{_fmt_labels(labels)} {v}")
        return out


class _Series:
    __slots__ = ("counts", "sum", "count")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0
        self.count = 0


class Histogram:
    """A histogram with fixed upper bounds (seconds), optionally one series per label set."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(sorted(buckets))
        self.series: dict[Labels, _Series] = {}

    def observe(self, v: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series(len(self.bounds))
        s.sum += v
        s.count += 1
        for i, b in enumerate(self.bounds):
            if v <= b:
                s.counts[i] += 1

    @property
    def count(self) -> int:
        return sum(s.count for s in self.series.values())

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, s in sorted(self.series.items()) or [((), _Series(len(self.bounds)))]:
            for b, c in zip(self.bounds, s.counts):
                out.append(f"{self.name}_bucket{_fmt_labels(labels + (('le', _fmt_value(b)),))} {c}")
            out.append(f"{self.name}_bucket{_fmt_labels(labels + (('le', '+Inf'),))} {s.count}")
            out.append(f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(s.sum)}")
            out.append(f"{self.name}_count{_fmt_labels(labels)} {s.count}")
        return out


def gauge(name: str, help_text: str, value: float, labels: Labels = ()) -> list[str]:
    """Lines of one gauge sample, read at render time."""
    return gauges(name, help_text, [(labels, value)])


def gauges(name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    """Lines of one gauge family: its samples, each with its labels."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
            *(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}" for labels, v in samples)]


class Metrics:
    """Every metric the daemon exports; gauges are read from callbacks when rendered."""

    def __init__(self) -> None:
        self.blocks_committed = Counter("l2d_blocks_committed_total", "Blocks committed by this process.")
        self.txs_committed = Counter("l2d_txs_committed_total", "Transactions committed in blocks.")
        self.txs_accepted = Counter("l2d_txs_accepted_total", "Transactions admitted to the mempool.")
        self.txs_rejected = Counter("l2d_txs_rejected_total",
                                    "Transactions refused, by stage (admission or block) and reason.")
        self.snapshots = Counter("l2d_snapshots_total", "Snapshots written, by trigger.")
        self.http_requests = Counter("l2d_http_requests_total", "HTTP requests served, by route and status.")
        self.anchor_stage = Histogram("l2d_anchor_stage_seconds", "Time an anchor took to reach each status from "
                                      "the one before (BUILT: from its L2 block's commit).",
                                      (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0))
        self.http_seconds = Histogram("l2d_http_request_seconds", "Time to serve an HTTP request, by route.",
                                      (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
        self.http_malformed = Counter("l2d_http_malformed_requests_total",
                                      "Requests answered 400 before routing: not valid HTTP.")
        self.http_dropped = Counter("l2d_http_connections_dropped_total", "Client connections the API closed: over "
                                    "api.max_connections, or past api.header_timeout_ms or api.body_timeout_ms.")
        self.block_build = Histogram("l2d_block_build_seconds", "Time to build and commit one block.",
                                     (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.federation_refused = Counter("l2d_federation_inputs_refused_total",
                                          "Member messages and fetched blocks refused, by error.")
        self.federation_dropped = Counter("l2d_federation_inputs_dropped_total",
                                          "Member inputs dropped because the machine's inbox was full.")
        self.federation_evidence = Counter("l2d_federation_evidence_total",
                                           "Equivocations recorded (two proposals of one member in one round).")
        self.federation_rounds = Counter("l2d_federation_rounds_total",
                                         "Rounds this member went through: entered (a new height), failed (the "
                                         "next round of the same height after a proposal or with transactions "
                                         "waiting) or idle (nothing to propose).")
        self.federation_precommit = Histogram("l2d_federation_precommit_seconds",
                                              "From a block's timestamp (its proposal) to this member signing it: "
                                              "m precommits for it seen.",
                                              (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.federation_commit = Histogram("l2d_federation_commit_seconds",
                                           "From a block's timestamp (its proposal) to this member storing it with m signatures.",
                                           (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

    def render(self, gauges: Mapping[str, tuple[str, Callable[[], float]]]) -> str:
        """The whole exposition: counters and histogram, then each gauge name -> (help, read())."""
        lines: list[str] = []
        for name, (help_text, read) in gauges.items():
            lines += gauge(name, help_text, read())
        for c in (self.blocks_committed, self.txs_committed, self.txs_accepted, self.txs_rejected,
                  self.snapshots, self.http_requests, self.http_malformed, self.http_dropped,
                  self.federation_refused, self.federation_dropped, self.federation_evidence, self.federation_rounds):
            lines += c.render()
        lines += self.block_build.render()
        lines += self.http_seconds.render()
        lines += self.anchor_stage.render()
        lines += self.federation_precommit.render()
        lines += self.federation_commit.render()
        return "\n".join(lines) + "\n"
