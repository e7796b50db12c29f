"""What a decode receiver tells the prefill stages: where its KV pages are and how they look.

Receiver info crosses a trust boundary (it arrives over the network from another replica), so
it is validated on arrival: the layout must match the sender's own, and every byte range we
would write must lie inside a region the receiver says it registered. Mooncake rejects a write
outside every registered buffer, but it cannot tell one request's pages from another's. The
CUDA IPC handles of the same-node fast path are checked the same way: well formed, and every
written layer inside an allocation they map.
"""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt

from engine.kv_cache import KVCacheSpec, KVLayerRegion

RECEIVER_INFO_VERSION = 1


class InvalidReceiverInfo(ValueError):
    """Receiver info that must not be acted on; the message is the request's failure reason."""


class KVLayout(BaseModel, frozen=True):
    """The shape contract of one page of K or V, which both sides must share byte for byte."""

    page_size: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: PositiveInt  # layers of the whole model

    @classmethod
    def from_spec(cls, spec: KVCacheSpec, num_layers: int) -> KVLayout:
        return cls(
            page_size=spec.page_size,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=str(spec.dtype).removeprefix("torch."),
            num_layers=num_layers,
        )

    @property
    def page_nbytes(self) -> int:
        import torch  # here: the ingress and controller read these without torch

        elem = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.page_size * self.num_kv_heads * self.head_dim * elem


class LayerAddress(BaseModel, frozen=True):
    """One layer's KV region on the receiver: `[2, num_pages, page]` bytes from `base`."""

    layer: NonNegativeInt
    base: NonNegativeInt
    nbytes: PositiveInt
    kv_stride: PositiveInt
    page_stride: PositiveInt

    @classmethod
    def from_region(cls, region: KVLayerRegion) -> LayerAddress:
        return cls(
            layer=region.layer,
            base=region.base_address,
            nbytes=region.nbytes,
            kv_stride=region.kv_stride,
            page_stride=region.page_stride,
        )


class MetadataSlot(BaseModel, frozen=True):
    """Where the last prefill stage writes the first token and per-request metadata."""

    address: NonNegativeInt
    nbytes: PositiveInt


class IpcAllocation(BaseModel, frozen=True):
    """One device allocation holding receiver KV, exported with `cudaIpcGetMemHandle`.

    `base` and `nbytes` are the allocation's extent in the receiver's address space; a layer's
    region must lie inside one, and the sender reaches an address at the same offset in its
    mapping of the allocation.
    """

    handle: str  # the 64-byte cudaIpcMemHandle_t, hex
    base: NonNegativeInt
    nbytes: PositiveInt


class CudaIpcInfo(BaseModel, frozen=True):
    """What a same-node sender needs to copy GPU to GPU (transport/cuda_ipc/)."""

    node_id: str = Field(description="hostname/boot id of the receiver's machine")
    device_uuid: str = Field(description="UUID of the GPU holding the receiver's KV")
    allocations: tuple[IpcAllocation, ...]


class ReceiverInfo(BaseModel, frozen=True):
    """Everything a prefill stage needs to write one request's KV into a decode replica."""

    version: Literal[1] = RECEIVER_INFO_VERSION
    rid: str
    room: NonNegativeInt
    session_id: str = Field(description="the decode process's Mooncake session, host:rpc_port")
    layout: KVLayout
    layers: tuple[LayerAddress, ...]
    page_indices: tuple[NonNegativeInt, ...]
    metadata: MetadataSlot
    # Offered when the receiver's KV is in device memory and its fast path is on; a sender
    # that cannot use it (another node, CPU memory, IPC open fails) writes over Mooncake.
    cuda_ipc: CudaIpcInfo | None = None

    def for_layers(self, first: int, end: int) -> ReceiverInfo:
        """The slice a stage holding layers `[first, end)` needs (the controller forwards it)."""
        layers = tuple(a for a in self.layers if first <= a.layer < end)
        update: dict[str, object] = {"layers": layers}
        if self.cuda_ipc is not None:
            kept = tuple(
                alloc
                for alloc in self.cuda_ipc.allocations
                if any(
                    alloc.base < a.base + a.nbytes and a.base < alloc.base + alloc.nbytes
                    for a in layers
                )
            )
            update["cuda_ipc"] = self.cuda_ipc.model_copy(update={"allocations": kept})
        return self.model_copy(update=update)


def validate_receiver_info(
    info: ReceiverInfo,
    *,
    local_layout: KVLayout,
    layers: range,
    num_tokens: int | None = None,
    metadata_nbytes: int | None = None,
) -> None:
    """Raise `InvalidReceiverInfo` unless `info` is safe to write layers `layers` into.

    `num_tokens`, when known, must fit in the pages the receiver offers; `metadata_nbytes` is
    what the last stage will write into the metadata slot.
    """
    if info.layout != local_layout:
        diff = [
            f"{name}: ours {getattr(local_layout, name)!r}, theirs {getattr(info.layout, name)!r}"
            for name in type(local_layout).model_fields
            if getattr(local_layout, name) != getattr(info.layout, name)
        ]
        raise InvalidReceiverInfo("KV layout mismatch (" + "; ".join(diff) + ")")
    by_layer = {a.layer: a for a in info.layers}
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise InvalidReceiverInfo(f"receiver info lacks layers {missing}")
    if num_tokens is not None:
        needed = -(-num_tokens // local_layout.page_size)
        if len(info.page_indices) < needed:
            raise InvalidReceiverInfo(
                f"receiver offers {len(info.page_indices)} pages, {num_tokens} tokens need {needed}"
            )
    if len(set(info.page_indices)) != len(info.page_indices):
        raise InvalidReceiverInfo("receiver page indices repeat a page")
    page_nbytes = local_layout.page_nbytes
    top = max(info.page_indices, default=-1)
    for layer in layers:
        address = by_layer[layer]
        if address.page_stride < page_nbytes:
            raise InvalidReceiverInfo(
                f"layer {layer}: page stride {address.page_stride} < page size {page_nbytes} bytes"
            )
        # The highest byte we would touch: V of the highest page.
        end = address.kv_stride + top * address.page_stride + page_nbytes
        if top >= 0 and end > address.nbytes:
            raise InvalidReceiverInfo(
                f"layer {layer}: page {top} lies outside the receiver's registered region "
                f"({address.nbytes} bytes)"
            )
        if address.kv_stride < page_nbytes:
            raise InvalidReceiverInfo(
                f"layer {layer}: K and V overlap (kv stride {address.kv_stride})"
            )
    if metadata_nbytes is not None and info.metadata.nbytes < metadata_nbytes:
        raise InvalidReceiverInfo(
            f"metadata slot holds {info.metadata.nbytes} bytes, {metadata_nbytes} needed"
        )
    if info.cuda_ipc is not None:
        _validate_cuda_ipc(info.cuda_ipc, [by_layer[layer] for layer in layers])


_HANDLE_HEX = 2 * 64  # cudaIpcMemHandle_t is 64 bytes


def _validate_cuda_ipc(offer: CudaIpcInfo, layers: list[LayerAddress]) -> None:
    """Handles well formed, allocations disjoint, every written layer inside one allocation.

    The layer checks above bound every write by the layer's region; this bounds the region by
    what the handle maps, so no copy can leave the receiver's allocation.
    """
    for alloc in offer.allocations:
        handle = alloc.handle
        if len(handle) != _HANDLE_HEX or any(c not in "0123456789abcdef" for c in handle):
            raise InvalidReceiverInfo(
                f"CUDA IPC handle of allocation {alloc.base:#x} is not {_HANDLE_HEX} hex digits"
            )
    ordered = sorted(offer.allocations, key=lambda a: a.base)
    for prev, nxt in itertools.pairwise(ordered):
        if prev.base + prev.nbytes > nxt.base:
            raise InvalidReceiverInfo(
                f"CUDA IPC allocations {prev.base:#x} and {nxt.base:#x} overlap"
            )
    for address in layers:
        if not any(
            a.base <= address.base and address.base + address.nbytes <= a.base + a.nbytes
            for a in ordered
        ):
            raise InvalidReceiverInfo(
                f"layer {address.layer}: no CUDA IPC handle covers its region "
                f"({address.base:#x} + {address.nbytes} bytes)"
            )
