"""Bitcoin anchoring: the service that commits L2 state roots to Bitcoin and the anchor transactions it builds."""
