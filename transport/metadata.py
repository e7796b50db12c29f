"""First-token metadata: what the last prefill stage writes next to the KV, and the slots for it.

A slot is a small fixed-size record in a buffer both sides register with Mooncake. The record
carries the request's room, so a reader never mistakes a stale record of an earlier request
that used the same slot for its own; a trailing magic word marks a completely written record.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `FirstToken` is read by processes without torch (the prefill controller)
    import torch

_RECORD = struct.Struct("<QqdqQ")  # room, first token id, its logprob, prompt tokens, magic
_MAGIC = 0x5044_5345_5256_4531  # "PDSERVE1"
SLOT_NBYTES = 64


class MetadataSlotsExhausted(RuntimeError):
    """Every metadata slot is held: too many requests in flight for this process's config."""


@dataclass(frozen=True)
class FirstToken:
    """The last stage's result for one request, delivered with its KV."""

    room: int
    token_id: int
    logprob: float
    num_prompt_tokens: int
    # The first token's top alternatives, when asked: they travel with the prefill's answer
    # (the `PrefillResult`), not in the fixed-size metadata slot.
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # The prompt's scores, when asked (echo with logprobs): they travel the same way.
    prompt_logprobs: list | None = None
    # Choices 1..n-1 of a request of n: each one's (first token, logprob, alternatives).
    more_choices: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()

    def pack(self) -> bytes:
        return _RECORD.pack(
            self.room, self.token_id, self.logprob, self.num_prompt_tokens, _MAGIC
        ).ljust(SLOT_NBYTES, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, room: int) -> FirstToken | None:
        """The record in `raw` if it is complete and belongs to `room`, else None."""
        got_room, token_id, logprob, num_prompt, magic = _RECORD.unpack_from(raw)
        if magic != _MAGIC or got_room != room:
            return None
        return cls(room=got_room, token_id=token_id, logprob=logprob, num_prompt_tokens=num_prompt)


class MetadataSlots:
    """A pinned buffer of `num_slots` records and the free list that hands them out."""

    def __init__(self, num_slots: int) -> None:
        import torch

        self.buffer = torch.zeros(num_slots * SLOT_NBYTES, dtype=torch.uint8)
        self._free = list(range(num_slots - 1, -1, -1))
        self._held: set[int] = set()
        self._lock = threading.Lock()

    @property
    def base_address(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def num_held(self) -> int:
        return len(self._held)

    def address(self, slot: int) -> int:
        return self.base_address + slot * SLOT_NBYTES

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise MetadataSlotsExhausted(
                    f"all {len(self._held)} metadata slots are in use; raise metadata_slots"
                )
            slot = self._free.pop()
            self._held.add(slot)
        self._view(slot).zero_()
        return slot

    def release(self, slot: int) -> None:
        """Return a slot; releasing one that is not held is ignored (release is idempotent)."""
        with self._lock:
            if slot in self._held:
                self._held.remove(slot)
                self._free.append(slot)

    def write(self, slot: int, record: FirstToken) -> None:
        import torch

        self._view(slot).copy_(torch.frombuffer(bytearray(record.pack()), dtype=torch.uint8))

    def read(self, slot: int, room: int) -> FirstToken | None:
        return FirstToken.unpack(bytes(self._view(slot).numpy()), room)

    def _view(self, slot: int) -> torch.Tensor:
        return self.buffer[slot * SLOT_NBYTES : (slot + 1) * SLOT_NBYTES]
