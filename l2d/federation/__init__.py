"""The federation's runtime: the member transport (transport.py, wire.py)."""
