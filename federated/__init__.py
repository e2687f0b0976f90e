"""Federated learning: Flower server and client apps, robust aggregation, DP and rewards."""
