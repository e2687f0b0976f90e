"""l2-verify: offline verifier for snapshots and state proofs; imports only the consensus core."""
