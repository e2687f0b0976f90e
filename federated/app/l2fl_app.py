"""Entry module of the Flower app: re-exports the project's ServerApp and ClientApp."""

from federated.client_app import app as client
from federated.server_app import app as server

__all__ = ["client", "server"]
