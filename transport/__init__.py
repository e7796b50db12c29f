"""KV transfer from prefill stages to decode replicas over the Mooncake transfer engine.

Names load on first use, so importing a light submodule (`transport.poll`, `transport.config`)
does not load torch and the transfer engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FirstToken": "transport.metadata",
    "IllegalTransition": "transport.poll",
    "InvalidReceiverInfo": "transport.receiver_info",
    "KVLayout": "transport.receiver_info",
    "KVPoll": "transport.poll",
    "KVReceiver": "transport.receiver",
    "KVSender": "transport.sender",
    "MetadataSlotsExhausted": "transport.metadata",
    "ReceiverInfo": "transport.receiver_info",
    "TransferEndpoint": "transport.endpoint",
    "TransportConfig": "transport.config",
    "TransportError": "transport.endpoint",
    "TransportFaults": "transport.faults",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
