"""Paged KV cache of one stage (or of the whole model) in the vLLM layout.

Per layer one tensor `[2, num_pages, page_size, num_kv_heads, head_dim]` (index 0 = K, 1 = V).
The transport addresses page `p` of K or V of layer `l` as
`base_address(l) + kv * kv_stride + p * page_stride`, so this module exposes exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the spec travels to processes without torch (the prefill controller)
    import torch


@dataclass(frozen=True)
class KVLayerRegion:
    """Where one layer's KV lives in memory and how to step through it, in bytes."""

    layer: int  # absolute layer index in the model
    base_address: int
    nbytes: int
    kv_stride: int  # K -> V
    page_stride: int  # page p -> p + 1
    token_stride: int  # slot within a page
    page_nbytes: int  # bytes of one page of K (or of V)


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape contract both sides of a transfer must agree on."""

    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


class PagedKVCache:
    """Owns the KV tensors of layers `[first_layer, first_layer + num_layers)`."""

    def __init__(
        self,
        spec: KVCacheSpec,
        first_layer: int,
        num_layers: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.first_layer = first_layer
        import torch

        shape = (2, spec.num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.layers = [
            torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(num_layers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def flat_kv(self, local_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer as `[num_pages * page_size, num_kv_heads, head_dim]` views."""
        t = self.layers[local_layer]
        return t[0].view(-1, t.shape[3], t.shape[4]), t[1].view(-1, t.shape[3], t.shape[4])

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copies pages `src` onto pages `dst` in every layer (the n choices of one prompt:
        each writes its own tokens into its copy of the prompt's last, partial page)."""
        import torch

        device = self.layers[0].device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        for t in self.layers:
            t[:, d] = t[:, s]

    def regions(self) -> list[KVLayerRegion]:
        out = []
        for i, t in enumerate(self.layers):
            elem = t.element_size()
            out.append(
                KVLayerRegion(
                    layer=self.first_layer + i,
                    base_address=t.data_ptr(),
                    nbytes=t.numel() * elem,
                    kv_stride=t.stride(0) * elem,
                    page_stride=t.stride(1) * elem,
                    token_stride=t.stride(2) * elem,
                    page_nbytes=t.stride(1) * elem,
                )
            )
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
