"""What the handlers may use, one typed aiohttp AppKey per dependency (never the whole node).

The composition root (l2d/node.py) fills an ApiDeps; make_app puts each part under its key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from anchoring.service import AnchorService
from bridge.service import BridgeService
from orchestration.service import OrchestrationService

from ..admission import Admission
from ..consensus import FederationHost
from ..core.pegs import Federation
from ..metrics import Metrics
from ..model_store import ModelStore
from ..snapshots import Snapshots
from ..ratelimit import RateLimiter
from ..sigpool import SignaturePool
from ..views import ChainView


@dataclass(frozen=True, slots=True)
class ApiDeps:
    chain: ChainView
    admission: Admission
    snapshots: Snapshots
    metrics: Metrics
    models: ModelStore
    admin_token: str  # "" disables the admin endpoints
    max_body_bytes: int
    members: FederationHost
    anchors: Optional[AnchorService] = None
    federation: Optional[Federation] = None
    bridge: Optional[BridgeService] = None
    orchestration: Optional[OrchestrationService] = None
    rate_limit: Optional[RateLimiter] = None  # None: no limit (l2d/api/limits.py)
    signatures: SignaturePool = SignaturePool(0)  # batch submissions' signature checks (0 workers: inline)


CHAIN = web.AppKey("chain", ChainView)
ADMISSION = web.AppKey("admission", Admission)
SNAPSHOTS = web.AppKey("snapshots", Snapshots)
METRICS = web.AppKey("metrics", Metrics)
MODELS = web.AppKey("models", ModelStore)
ADMIN_TOKEN = web.AppKey("admin_token", str)
MEMBERS = web.AppKey("members", FederationHost)
ANCHORS: web.AppKey[Optional[AnchorService]] = web.AppKey("anchors")
FEDERATION: web.AppKey[Optional[Federation]] = web.AppKey("federation")
BRIDGE: web.AppKey[Optional[BridgeService]] = web.AppKey("bridge")
ORCHESTRATION: web.AppKey[Optional[OrchestrationService]] = web.AppKey("orchestration")
SIGNATURES = web.AppKey("signatures", SignaturePool)
