"""Bitcoin bridge: bitcoind RPC and ZMQ client, SPV checks, peg-in and peg-out."""
