"""Relay network: relay mesh, signed relay receipts and relay rewards."""
