"""Task client: sign and submit a digits task (or cancel one) over REST, and show a task.

    python -m orchestration.client --node URL --key-file KEY submit --bounty 5000 --digits 1500 1501 1502
    python -m orchestration.client --node URL --key-file KEY cancel TASK_ID
    python -m orchestration.client --node URL show TASK_ID
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from l2d.client import ApiError, Client, Unreachable
from l2d.core.errors import DecodeError
from l2d.core.params import network_by_name
from l2d.core.payload import Payload
from l2d.core.work_tx import MAX_IMAGES, TaskCancel, TaskSubmit
from l2d.keys import KeyFileError, load_secret


class ClientError(Exception):
    """Bad arguments (a refused request is an l2d.client.ApiError); the message says which."""


def _sign(args: argparse.Namespace, client: Client, payload: Payload) -> bytes:
    """payload signed with --key-file for --network, with the account's committed nonce."""
    secret = load_secret(Path(args.key_file))
    return client.sign(secret, payload, args.fee, network=network_by_name(args.network)).raw


def digits_input(indices: Sequence[int]) -> bytes:
    """The images at these indices of scikit-learn's bundled digits (0..1796), as task input."""
    # imported here: scikit-learn is slow to import and only `submit` needs it
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits().data
    if not 1 <= len(indices) <= MAX_IMAGES or any(not 0 <= i < len(data) for i in indices):
        raise ClientError(f"give 1..{MAX_IMAGES} digit indices in 0..{len(data) - 1}")
    return bytes(int(p) for i in indices for p in data[i])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2-task", description=__doc__.split("\n\n")[0])
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
    client = Client(args.node)
    try:
        if args.cmd == "show":
            out = client.task(args.task_id)
        elif args.key_file is None:
            raise ClientError("--key-file is required to sign")
        elif args.cmd == "submit":
            try:
                payload: Payload = TaskSubmit(args.bounty, args.min_reputation_ppm, args.max_price,
                                              args.model.encode(), args.region.encode(), digits_input(args.digits))
            except DecodeError as e:
                raise ClientError(str(e)) from None
            out = client.submit_task(_sign(args, client, payload))
        else:
            try:
                payload = TaskCancel(bytes.fromhex(args.task_id))
            except (ValueError, DecodeError) as e:
                raise ClientError(f"task id: {e}") from None
            out = client.submit_tx(_sign(args, client, payload))
    except Unreachable as e:  # worded as before the shared client: the URL of the request
        print(f"orchestration.client: cannot reach {e.url}{e.path}: {e.reason}", file=sys.stderr)
        return 1
    except (ClientError, ApiError, KeyFileError) as e:
        print(f"orchestration.client: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
