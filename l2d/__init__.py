"""l2d: a Bitcoin-anchored, federated Layer-2 daemon for verifiable AI work."""

__version__ = "0.1.0"
