"""The hop layer in isolation: what one side seals the other opens, exactly once, in order, and nothing else."""
from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from netflow.wire import MAX_DATA, MAX_FRAME, TAG, Cmd, HopKeys, Kind, WireError, client_hop, relay_hop, x25519_public


def _pair() -> tuple[HopKeys, HopKeys]:
    relay_key = X25519PrivateKey.generate()
    pub, client = client_hop(x25519_public(relay_key))
    relay = relay_hop(relay_key, pub)
    assert relay.confirm == client.confirm
    return client, relay


@pytest.mark.parametrize("size", [0, 1, 1000, MAX_DATA])
def test_a_layer_sealed_forward_opens_at_the_relay_and_back_at_the_client(size: int) -> None:
    client, relay = _pair()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = client.seal_fwd(Cmd.DATA, data)
    assert body[0] == Kind.RELAY and len(body) == 1 + 1 + size + TAG
    plain = relay.open_fwd(body)
    assert plain[0] == Cmd.DATA and bytes(plain[1:]) == data
    framed = relay.seal_bwd(Cmd.FORWARD, memoryview(data), framed=True)
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4
    back = client.open_bwd(framed[4:])
    assert back[0] == Cmd.FORWARD and bytes(back[1:]) == data


def test_layers_open_only_in_order_and_only_once() -> None:
    client, relay = _pair()
    first, second = client.seal_fwd(Cmd.DATA, b"one"), client.seal_fwd(Cmd.DATA, b"two")
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(second)  # reordered: the relay expects the first nonce
    client, relay = _pair()
    first = client.seal_fwd(Cmd.DATA, b"one")
    assert bytes(relay.open_fwd(first)[1:]) == b"one"
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(first)  # replayed


def test_an_altered_byte_the_other_direction_s_key_or_a_malformed_body_is_refused() -> None:
    client, relay = _pair()
    body = client.seal_fwd(Cmd.DATA, b"payload")
    altered = bytearray(body)
    altered[3] ^= 1
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(altered)
    client, relay = _pair()
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_bwd(client.seal_fwd(Cmd.DATA, b"payload"))  # a forward layer is not a backward one
    for bad in (b"", bytes([Kind.RELAY]) + bytes(TAG), bytes([Kind.CREATE]) + bytes(40)):
        with pytest.raises(WireError, match="inside a circuit"):
            relay.open_fwd(bad)


def test_a_layer_larger_than_a_frame_is_refused_before_it_is_sent() -> None:
    client, _ = _pair()
    with pytest.raises(WireError, match="frame of"):
        client.seal_fwd(Cmd.FORWARD, bytes(MAX_FRAME))
