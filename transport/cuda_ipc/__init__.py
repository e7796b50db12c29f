"""The same-node fast path: KV pages move GPU to GPU through CUDA IPC instead of Mooncake tcp.

A decode process exports each device allocation that holds its KV once (`cudaIpcGetMemHandle`)
and offers the handles in its receiver info, with the node it runs on and its GPU's UUID. A
prefill stage on the same node that can see that GPU opens the handles once per peer.

Per peer and layer set, a `PageRoute` is worked out once: where K and V of every layer start
on both sides (the peer's as mapped here), uploaded to the GPU as a small table, and CUDA graphs
of its copy, one per staging slot. A request then costs its page runs (a list compare when both
sides are one run), the run table written into its slot of mapped pinned host memory (which the
GPU reads itself: no upload call) and one `cudaGraphLaunch` on the caller's stream, issued by
`send` on the thread that computed the KV (queued behind it; no thread hop). The graph ends by
recording the slot's event, which the sender's `poll` queries; the write is done only once it
has passed. Every per-request CUDA call is a ctypes function bound once, on raw handles.

Whatever a route cannot take (strided pages, the receiver on another GPU of the node, pages
outside the cache) goes the general way: the tcp path's segments, planned against the mapping,
copied on a side stream from the transfer pool, the rest by Mooncake.

This package only moves bytes and decides whether it can: the sender's state machine,
validation, timeouts and the first-token record (CPU memory, so still Mooncake) are the tcp
path's. Whenever the peer is elsewhere, the memory is CPU memory, or an open fails, the sender
gets the Mooncake mover instead. Mappings stay open per peer while it answers probes; a peer
whose probe fails (it went away) or the endpoint's close unmaps them, after any copy still
using them has finished.

One job per module; import names from the module that defines them:

- `driver`: the CUDA runtime and driver calls through ctypes (`CudaRuntime`), `IpcOpenError`,
  `node_id`.
- `kernels`: the Triton copy kernels and the general path's copy list (`Copies`).
- `staging`: per-request run tables in mapped host memory and the events that end their copies
  (`SlotDone`).
- `routes`: how a sender's layers reach a peer's (`PageRoute`) and a request's page runs over
  one (`PageRuns`, `plan_runs`).
- `backend`: what the fast path needs from the machine (`IpcBackend`) and the CUDA one
  (`CudaIpc`), which checks each of its copy paths at warm-up.
- `mapping`: one peer's opened allocations (`PeerMapping`).
- `mover`: an endpoint's fast path (`CudaIpcPath`) and a sender's byte mover over it
  (`CudaIpcMover`, `IpcCopy`).
"""
