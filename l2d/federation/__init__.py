"""The federation's member protocol, sans-IO: messages, the signer's safety state, and the per-member state machine
(docs/federation.md). Time and received messages are inputs, actions are outputs; nothing here does I/O."""
