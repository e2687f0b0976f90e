"""The federation's member protocol (docs/federation.md): messages, the signer's safety state and the per-member
state machine, all sans-IO (time and received messages are inputs, actions are outputs), and the member transport
(transport.py, wire.py), the one part here that does network I/O. The daemon side that drives them is l2d/consensus.py."""
