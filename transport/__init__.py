"""KV transfer from prefill stages to decode replicas over the Mooncake transfer engine."""

from transport.config import TransportConfig
from transport.endpoint import TransferEndpoint, TransportError
from transport.faults import TransportFaults
from transport.metadata import FirstToken, MetadataSlotsExhausted
from transport.poll import IllegalTransition, KVPoll
from transport.receiver import KVReceiver
from transport.receiver_info import InvalidReceiverInfo, KVLayout, ReceiverInfo
from transport.sender import KVSender

__all__ = [
    "FirstToken",
    "IllegalTransition",
    "InvalidReceiverInfo",
    "KVLayout",
    "KVPoll",
    "KVReceiver",
    "KVSender",
    "MetadataSlotsExhausted",
    "ReceiverInfo",
    "TransferEndpoint",
    "TransportConfig",
    "TransportError",
    "TransportFaults",
]
