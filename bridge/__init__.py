"""Bitcoin bridge runtime: bitcoind RPC and ZMQ clients, the header store, peg-out signers and the bridge service."""
