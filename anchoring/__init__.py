"""Bitcoin anchoring: anchor payloads and the service that commits L2 state roots to Bitcoin."""
