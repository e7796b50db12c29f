"""Where a stage queues its KV sends: a side stream that waits for the forward.

A stage starts its sends right after queuing its forward, before it waits for the result (the
hidden states' copy to the host, or sampling). On the forward's own stream that wait would
also wait for the KV copies; on a side stream ordered behind the forward, the copies start the
moment the forward ends on the GPU and run beside what the stage does next, and their launch
costs the host nothing on the request's path. The next forward waits for them in turn
(`after_sends`): the controller frees a failed request's pages at once, and a copy of them may
still be queued.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_streams: dict[int, torch.cuda.Stream] = {}
_lock = threading.Lock()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        stream = _streams.get(index)
        if stream is None:
            stream = _streams[index] = torch.cuda.Stream(index)
        return stream


@contextmanager
def behind_current_stream(device: torch.device) -> Iterator[None]:
    """Make a side stream, ordered after the work queued so far on `device`'s current stream,
    current for the block; a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


def after_sends(device: torch.device) -> None:
    """Order `device`'s current stream after every send queued on the side stream so far, on
    the GPU (the host does not wait); a no-op off CUDA.

    A stage calls it before a forward: that forward may write pages the controller freed (a
    request failed or aborted) while their copy was still queued behind the previous one.
    Successful requests need no such care: their pages are freed only after the copy landed.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))
