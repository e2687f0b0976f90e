"""argparse types shared by the command-line tools: a missing input file or output directory is a usage error
(argparse's message, exit 2), found before anything is asked of a daemon or written."""
from __future__ import annotations

import argparse
from pathlib import Path


def existing_file(arg: str) -> str:
    """An argparse type: a path that names an existing file."""
    p = Path(arg).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{arg} is a directory, not a file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {arg}")
    return str(p)


def output_file(arg: str) -> str:
    """An argparse type: a file to write, in a directory that exists."""
    p = Path(arg).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{arg} is a directory, not a file")
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {p.parent} (to write {arg})")
    return str(p)
