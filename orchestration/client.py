"""Task client: sign and submit a digits task (or cancel one) over REST, and show a task.

    python -m orchestration.client --node URL --key-file KEY submit --bounty 5000 --digits 1500 1501 1502
    python -m orchestration.client --node URL --key-file KEY cancel TASK_ID
    python -m orchestration.client --node URL show TASK_ID
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from coincurve import PrivateKey

from l2d.core import tx as T
from l2d.core.errors import DecodeError
from l2d.core.params import network_by_name
from l2d.core.payload import Payload
from l2d.core.work_tx import MAX_IMAGES, TaskCancel, TaskSubmit


class ClientError(Exception):
    """A refused request or bad arguments; the message says which."""


def _call(url: str, body: Optional[dict[str, Any]] = None) -> Any:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            detail = json.loads(e.read())
        raise ClientError(f"{e.code} {detail.get('error')}: {detail.get('message')}") from None
    except urllib.error.URLError as e:
        raise ClientError(f"cannot reach {url}: {e.reason}") from None


def _sign(args: argparse.Namespace, payload: Payload) -> bytes:
    try:
        secret = bytes.fromhex(Path(args.key_file).read_text().strip())
        pub = PrivateKey(secret).public_key_xonly.format()
    except (OSError, ValueError) as e:
        raise ClientError(f"key file {args.key_file}: {e}") from None
    nonce = int(_call(f"{args.node}/api/l2/accounts/{pub.hex()}")["nonce"])
    return T.sign(network_by_name(args.network), secret, nonce, args.fee, payload, os.urandom(32)).raw


def digits_input(indices: Sequence[int]) -> bytes:
    """The images at these indices of scikit-learn's bundled digits (0..1796), as task input."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits().data
    if not 1 <= len(indices) <= MAX_IMAGES or any(not 0 <= i < len(data) for i in indices):
        raise ClientError(f"give 1..{MAX_IMAGES} digit indices in 0..{len(data) - 1}")
    return bytes(int(p) for i in indices for p in data[i])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestration.client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", required=True)
    ap.add_argument("--key-file", help="the client's secret key (hex)")
    ap.add_argument("--network", default="local")
    ap.add_argument("--fee", type=int, default=1)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--bounty", type=int, required=True)
    s.add_argument("--digits", type=int, nargs="+", required=True, help="indices into the bundled digits")
    s.add_argument("--model", default="digits-mlp")
    s.add_argument("--region", default="")
    s.add_argument("--min-reputation-ppm", type=int, default=0)
    s.add_argument("--max-price", type=int, default=0, help="0 = no ceiling")
    c = sub.add_parser("cancel")
    c.add_argument("task_id")
    sh = sub.add_parser("show")
    sh.add_argument("task_id")
    args = ap.parse_args(argv)
    args.node = args.node.rstrip("/")
    try:
        if args.cmd == "show":
            out = _call(f"{args.node}/api/orchestration/tasks/{args.task_id}")
        elif args.key_file is None:
            raise ClientError("--key-file is required to sign")
        elif args.cmd == "submit":
            try:
                payload: Payload = TaskSubmit(args.bounty, args.min_reputation_ppm, args.max_price,
                                                args.model.encode(), args.region.encode(), digits_input(args.digits))
            except DecodeError as e:
                raise ClientError(str(e)) from None
            out = _call(f"{args.node}/api/orchestration/submit", {"tx": _sign(args, payload).hex()})
        else:
            try:
                payload = TaskCancel(bytes.fromhex(args.task_id))
            except (ValueError, DecodeError) as e:
                raise ClientError(f"task id: {e}") from None
            out = _call(f"{args.node}/api/l2/tx", {"tx": _sign(args, payload).hex()})
    except ClientError as e:
        print(f"orchestration.client: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
