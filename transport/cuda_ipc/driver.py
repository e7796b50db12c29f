"""The CUDA runtime and driver calls the fast path makes, through ctypes (no extra dependency),
and what decides whether a peer is on this node at all (`node_id`)."""

from __future__ import annotations

import ctypes
import glob
import os
import socket
from functools import cache
from typing import Any

import torch


class IpcOpenError(RuntimeError):
    """A peer's IPC handle could not be opened here; the sender falls back to Mooncake."""


@cache
def node_id() -> str:
    """This machine's identity as peers compare it: hostname and kernel boot id.

    The boot id tells two machines (or two boots) with one hostname apart; the hostname tells
    two containers on one kernel apart, where CUDA IPC may not reach across anyway.
    """
    boot = ""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                boot = f.read().strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}/{boot}"


# -- the CUDA runtime and driver calls, through ctypes (no extra dependency) ----------------------


class _IpcMemHandle(ctypes.Structure):
    _fields_ = (("reserved", ctypes.c_ubyte * 64),)


_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault
_HOST_ALLOC_PORTABLE_MAPPED = 1 | 2  # cudaHostAllocPortable | cudaHostAllocMapped
_EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
_EVENT_RECORD_EXTERNAL = 1  # cudaEventRecordExternal: an event record node when captured
_NOT_READY = 600  # cudaErrorNotReady


def _bind(lib: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


class CudaRuntime:
    """The few runtime/driver entry points IPC needs, from the libraries torch already loaded.

    The per-request ones (`graph_launch`, `event_record`, `event_query`) are bound once with
    their argument types and called on raw handles. They come through `PyDLL`, so they keep the
    GIL like torch's own launches do: none of them blocks, and releasing the GIL around a
    microsecond call only invites another thread to take it for longer. Blocking calls
    (`event_synchronize`) release it.
    """

    def __init__(self) -> None:
        torch.cuda.init()
        self._rt = self._load_cudart()
        self._drv = ctypes.CDLL("libcuda.so.1")
        self._rt.cudaGetErrorString.restype = ctypes.c_char_p
        self._rt.cudaGetErrorString.argtypes = (ctypes.c_int,)
        self._rt.cudaIpcGetMemHandle.argtypes = (ctypes.POINTER(_IpcMemHandle), ctypes.c_void_p)
        self._rt.cudaIpcOpenMemHandle.argtypes = (
            ctypes.POINTER(ctypes.c_void_p),
            _IpcMemHandle,
            ctypes.c_uint,
        )
        self._rt.cudaIpcCloseMemHandle.argtypes = (ctypes.c_void_p,)
        self._rt.cudaMemcpyAsync.argtypes = (
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        self._drv.cuMemGetAddressRange_v2.argtypes = (
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        )
        void_p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        self._host_alloc = _bind(self._rt, "cudaHostAlloc", pp, ctypes.c_size_t, ctypes.c_uint)
        self._host_device_pointer = _bind(
            self._rt, "cudaHostGetDevicePointer", pp, void_p, ctypes.c_uint
        )
        self._free_host = _bind(self._rt, "cudaFreeHost", void_p)
        self._event_create = _bind(self._rt, "cudaEventCreateWithFlags", pp, ctypes.c_uint)
        self._event_destroy = _bind(self._rt, "cudaEventDestroy", void_p)
        self._event_synchronize = _bind(self._rt, "cudaEventSynchronize", void_p)
        self._record_with_flags = _bind(
            self._rt, "cudaEventRecordWithFlags", void_p, void_p, ctypes.c_uint
        )
        hot = ctypes.PyDLL(self._rt._name)  # the same library, called with the GIL held
        self.graph_launch = _bind(hot, "cudaGraphLaunch", void_p, void_p)
        self.event_record = _bind(hot, "cudaEventRecord", void_p, void_p)
        self._event_query = _bind(hot, "cudaEventQuery", void_p)
        self._get_last_error = _bind(hot, "cudaGetLastError")

    @staticmethod
    def _load_cudart() -> ctypes.CDLL:
        major = (torch.version.cuda or "").split(".")[0]
        # The soname torch linked against resolves to the copy already loaded in this process.
        names = [f"libcudart.so.{major}", "libcudart.so"]
        torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
        names += sorted(
            glob.glob(os.path.join(torch_dir, "nvidia", "**", "libcudart.so*"), recursive=True)
        )
        errors = []
        for name in names:
            try:
                return ctypes.CDLL(name)
            except OSError as exc:
                errors.append(str(exc))
        raise OSError("cannot load libcudart: " + "; ".join(errors))

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            # Clear the runtime's last error, or torch's next launch check would report it.
            self._rt.cudaGetLastError()
            msg = self._rt.cudaGetErrorString(rc).decode(errors="replace")
            raise RuntimeError(f"{what} failed: {msg} ({rc})")

    def allocation_of(self, address: int) -> tuple[int, int]:
        """Base and size of the device allocation (cudaMalloc block) holding `address`."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = self._drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address)
        if rc != 0:
            raise RuntimeError(f"cuMemGetAddressRange({address:#x}) failed ({rc})")
        return base.value, size.value

    def get_mem_handle(self, base: int) -> bytes:
        handle = _IpcMemHandle()
        self.check(self._rt.cudaIpcGetMemHandle(ctypes.byref(handle), base), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def open_mem_handle(self, raw: bytes) -> int:
        ptr = ctypes.c_void_p()
        handle = _IpcMemHandle.from_buffer_copy(raw)
        rc = self._rt.cudaIpcOpenMemHandle(ctypes.byref(ptr), handle, _LAZY_ENABLE_PEER_ACCESS)
        self.check(rc, "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def close_mem_handle(self, ptr: int) -> None:
        self.check(self._rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync with cudaMemcpyDefault: unified addressing finds both devices."""
        rc = self._rt.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        self.check(rc, "cudaMemcpyAsync")

    # mapped host memory and events, for the per-request path ---------------------------------

    def host_alloc_mapped(self, nbytes: int) -> tuple[int, int]:
        """Pinned host memory the GPU reads in place: its host address and its device address."""
        host, device = ctypes.c_void_p(), ctypes.c_void_p()
        rc = self._host_alloc(ctypes.byref(host), nbytes, _HOST_ALLOC_PORTABLE_MAPPED)
        self.check(rc, "cudaHostAlloc")
        rc = self._host_device_pointer(ctypes.byref(device), host, 0)
        if rc != 0:
            self._free_host(host)
            self.check(rc, "cudaHostGetDevicePointer")
        return int(host.value or 0), int(device.value or 0)

    def free_host(self, host: int) -> None:
        self.check(self._free_host(host), "cudaFreeHost")

    def event_create(self) -> int:
        """A raw event without timing, on the current device."""
        event = ctypes.c_void_p()
        self.check(
            self._event_create(ctypes.byref(event), _EVENT_DISABLE_TIMING), "cudaEventCreate"
        )
        return int(event.value or 0)

    def event_destroy(self, event: int) -> None:
        self._event_destroy(event)

    def record_external(self, event: int, stream: int) -> None:
        """Record `event` on a capturing stream as a node of the graph (it records per launch)."""
        rc = self._record_with_flags(event, stream, _EVENT_RECORD_EXTERNAL)
        self.check(rc, "cudaEventRecordWithFlags")

    def event_query(self, event: int) -> bool:
        """Whether the work before the event's last record has finished (never blocks)."""
        rc = self._event_query(event)
        if rc == 0:
            return True
        if rc == _NOT_READY:
            self._get_last_error()  # as torch does: "not ready" must not linger as an error
            return False
        self.check(rc, "cudaEventQuery")
        return False

    def event_synchronize(self, event: int) -> None:
        self.check(self._event_synchronize(event), "cudaEventSynchronize")
