"""One request's KV, GPU to GPU across two processes: CUDA IPC fast path vs Mooncake tcp vs copy.

Shape: a Qwen2-1.5B-like KV cache (28 layers, 2 KV heads of 128, bfloat16, 16-token pages: 8 KiB
per page of K or V, 28 KiB per token over all layers), requests of 2k and 16k tokens. The prefill
side is this process (one `KVSender` holding every layer, the project's real sender); the decode
side is a spawned process with its cache on the same GPU (tests/transport/peer.py with
`device="cuda"`, the real `KVReceiver`). Timed:

- `fast path`: the sender with the CUDA IPC mover. `write` = `send->Success`: from entering
  `send` (which plans the runs, launches the copy on this thread's stream and submits the
  first-token record) to the `poll` that reports Success, polling back to back (a scheduler
  polls once per iteration instead), with the GPU idle when `send` is called. `send_ms`: the
  host time inside `send`. Last stage (KV + first-token record) and a middle stage (KV only).
  No probes are installed during these runs.
- `behind a forward` (`added_*`): what the transfer adds when `send` is called right after a
  forward was queued, as the prefill stage calls it: the copy queues behind the compute on the
  same stream, so the host part of `send` overlaps the GPU's work as far as the GPU still has
  work queued. A stand-in forward is queued (`Forward`: model-sized, the MLP matmuls of
  Qwen2-1.5B over the request's tokens, GPU-bound; `hostbound_*`: a light one whose launches
  take about as long as its GPU work), then either `send` + polling to Success, or (forward
  only) an event polled back to back; the two kinds alternate, and `added` = the difference of
  their medians (each from queuing the forward to done; noisy where the forward is long).
  `added_GB_s` = bytes / added. Per request and less noisy (`*_done_to_success_ms`): an event
  recorded after the forward, then `send`, then polling the event and the sender back to back:
  from the first poll that sees the forward done to Success. Also the GPU's view
  (`*_gpu_ms`): time between that event and one recorded after `send` on the stream (the copy
  plus any gap where the GPU waited for the host's launch).
- `stage order` (`stage_order_*`): the order the stage actor uses: a model-sized forward
  queued, `send` on a side stream behind it, then `out.cpu()`; `stage_order_ms` is the GPU's
  time from the forward's end to the copy's end (the headline's `stage order` flow, whose
  target figure this is), `stage_order_copy_ms` the same for a `copy_` in the place of `send`,
  `*_after_wait_ms` the host's time from `out.cpu()`'s return to Success.
- `mooncake tcp`: the same sender with the fast path off (Mooncake tcp on loopback, written on
  the pool; polled every 20 us so the pool thread gets the GIL).
- `device copy`: in this process, one `copy_` of as many contiguous bytes (GPU time: the
  ceiling), and the fast path's own page copy of the request's runs (GPU time between events,
  and host time from launch to done).
- a breakdown of the fast path's `send` (separate KV-only runs with timers on each call, which
  add ~1-3 us each): planning the runs (`plan_ms`), the launch (`launch_ms`: slot, run table,
  graph launch, event), the record's submit (`record_ms`, last stage only), `wait_ms` =
  write - send of the probe-free runs; `cold_*_ms`: each call inside the launch in this flow,
  `hot_*_ms` the same calls in a loop of launches alone (the last row); `busy_*`: KV-only writes
  with this thread kept busy for 1 ms before `send` instead of coming from a sleep on the pipe.

Target: fast path >= 0.5x the one-copy bandwidth, in the stage's order
(`stage_order_vs_copy`). Bandwidth counts bytes moved once (a copy reads and writes each: 1.5
TB/s here is 3.0 TB/s read+write). Pages are checked by checksum after the first transfer of
each kind. Also probed: whether host memory can be exported with CUDA IPC (the first-token slot
is host memory).

This file holds the flows and the reports; the set-up (decode process, sending side, buffers)
is in kv_transfer_setup.py, the probes and in-process copies in kv_transfer_probes.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

os.environ.setdefault("GLOG_minloglevel", "2")

import torch

from benchmarks.gpu.kv_transfer_probes import (
    call_probes,
    device_copies,
    host_memory_ipc,
    phase_medians,
    phase_probes,
    profile_launch,
    restore_probes,
)
from benchmarks.gpu.kv_transfer_setup import (
    CASES,
    SHAPE,
    Forward,
    LightForward,
    ModelForward,
    OneCopy,
    PrefillSide,
    case_pages,
    decode_peer,
    gpu_time,
    launches_in_send,
    poll_until_done,
)
from benchmarks.report import write_report
from transport import KVPoll, KVSender, TransportConfig
from transport.cuda_ipc.backend import CudaIpc
from transport.streams import behind_current_stream


class Prefill(PrefillSide):
    """This process's side with the flows that are timed: how `send` is called and polled."""

    def transfer(
        self, local: list[int], remote: list[int], last: bool, spin_s: float = 0.0
    ) -> tuple[KVSender, float, float]:
        """One request; returns the finished sender, its send->Success and in-send seconds.

        `spin_s`: keep this thread busy that long right before `send` (as a scheduler loop
        is), instead of coming straight from sleeping on the pipe to the decode process."""
        sender, token = self.prepare(remote, last)
        busy = launches_in_send(sender)
        start = time.perf_counter()
        while time.perf_counter() - start < spin_s:
            pass
        start = time.perf_counter()
        sender.send(local, token)
        sent = time.perf_counter()
        poll_until_done(sender, busy)
        wall = time.perf_counter() - start
        self.peer.settle(sender.rid, True)  # frees the receiver (a middle stage's lacks the record)
        return sender, wall, sent - start

    def behind_forward(
        self, forward: Forward, local: list[int], remote: list[int], last: bool, send: bool
    ) -> float:
        """Queue `forward`, then `send` and poll to Success (or, if not `send`, poll an event
        after the forward); returns seconds from queuing the forward to done."""
        sender, token = self.prepare(remote, last)
        start = time.perf_counter()
        forward.queue(local)
        if send:
            sender.send(local, token)
            poll_until_done(sender, busy=launches_in_send(sender))
        else:
            end = torch.cuda.Event()
            end.record()
            while not end.query():
                pass
        wall = time.perf_counter() - start
        if send:
            self.peer.settle(sender.rid, True)
        else:
            sender.abort("forward only")
            self.peer.settle(sender.rid, False, "forward only")
        return wall

    def gpu_behind_forward(
        self, forward: Forward, local: list[int], remote: list[int], last: bool
    ) -> tuple[float, float]:
        """Queue `forward`, record an event, `send`, and poll the event then the sender back to
        back: seconds from the forward's completion (the first poll that sees the event
        passed) to Success, and the GPU's seconds between the forward's end and the copy's."""
        sender, token = self.prepare(remote, last)
        forward.queue(local)
        after_forward = torch.cuda.Event(enable_timing=True)
        after_copy = torch.cuda.Event(enable_timing=True)
        after_forward.record()
        sender.send(local, token)
        after_copy.record()
        while not after_forward.query():
            if sender.poll() is KVPoll.Failed:
                raise RuntimeError(sender.failure_reason)
        forward_done = time.perf_counter()
        poll_until_done(sender, busy=launches_in_send(sender))
        success = time.perf_counter()
        after_copy.synchronize()
        self.peer.settle(sender.rid, True)
        return success - forward_done, after_forward.elapsed_time(after_copy) / 1e3

    def copy_in_flow(self, copy: OneCopy, remote: list[int]) -> float:
        """One `copy_` in the place of `send`: after the same bootstrap (a pipe round trip to
        the decode process, its receiver info validated, a new sender), launched and polled to
        its end the same way. Seconds from the launch to the poll that sees it done: what any
        GPU work launched from that state costs, as a reference for the fast path's write."""
        sender, _ = self.prepare(remote, False)
        end = torch.cuda.Event()
        start = time.perf_counter()
        copy()
        end.record()
        while not end.query():
            pass
        wall = time.perf_counter() - start
        self._let_go(sender, reference=True)
        return wall

    def stage_order(
        self,
        forward: Forward,
        local: list[int],
        remote: list[int],
        last: bool,
        reference: OneCopy | None = None,
    ) -> tuple[float, float]:
        """The stage actor's order now (cluster/stage_actor.py): queue `forward`, `send` on a
        side stream behind it (`behind_current_stream`), wait for the forward with
        `out.cpu()`, then (last stage) the sampled token, and poll back to back to Success;
        with `reference`, that copy goes on the side stream in the place of `send`. Returns
        the GPU's seconds from the forward's end to the copy's end (events on the two
        streams: the transfer from the moment its KV exists), and the host's seconds from
        the wait's return to Success."""
        sender, token = self.prepare(remote, last)
        forward.queue(local)
        ready = torch.cuda.Event(enable_timing=True)
        landed = torch.cuda.Event(enable_timing=True)
        ready.record()
        with behind_current_stream(torch.device("cuda")):
            if reference is None:
                sender.send(local)
            else:
                reference()
            landed.record()
        forward.sync()
        waited = time.perf_counter()
        if reference is None:
            if token is not None:
                sender.send_first_token(token)
            poll_until_done(sender, busy=launches_in_send(sender))
        else:
            while not landed.query():
                pass
        done = time.perf_counter() - waited
        landed.synchronize()
        self._let_go(sender, reference is not None)
        return ready.elapsed_time(landed) / 1e3, done


def fast_series(
    fast: Prefill, local: list[int], remote: list[int], reps: int, last: bool, spin_s: float = 0.0
) -> tuple[float, float]:
    """Median send->Success and in-send seconds of `reps` fast-path requests."""
    walls, sends = [], []
    for _ in range(reps):
        sender, wall, in_send = fast.transfer(local, remote, last=last, spin_s=spin_s)
        assert sender.stats.mover == "cuda_ipc", sender.mover
        walls.append(wall)
        sends.append(in_send)
    return statistics.median(walls), statistics.median(sends)


def forward_series(
    fast: Prefill, forward: Forward, local: list[int], remote: list[int], reps: int, last: bool
) -> dict[str, float]:
    """Forward only and forward + send alternating (the order flips each rep), then in separate
    runs the forward's completion to Success and the GPU's view: median seconds of each."""
    alone, with_send = [], []
    for rep in range(reps):
        for send in (False, True) if rep % 2 else (True, False):
            wall = fast.behind_forward(forward, local, remote, last, send)
            (with_send if send else alone).append(wall)
    direct = [fast.gpu_behind_forward(forward, local, remote, last) for _ in range(reps)]
    return {
        "forward": statistics.median(alone),
        "forward_send": statistics.median(with_send),
        "done_to_success": statistics.median(d for d, _ in direct),
        "gpu_added": statistics.median(g for _, g in direct),
    }


def side_by_side(
    measure: Callable[..., tuple[float, float]], reference: OneCopy, reps: int
) -> dict[str, list[tuple[float, float]]]:
    """`measure(last, reference)` for a `copy_` in the place of `send`, KV only and the last
    stage, interleaved rep by rep so that the three see the same machine."""
    out: dict[str, list[tuple[float, float]]] = {"copy": [], "KV only": [], "last stage": []}
    for _ in range(reps):
        out["copy"].append(measure(False, reference))
        out["KV only"].append(measure(False))
        out["last stage"].append(measure(True))
    return out


def _headline_row(
    case: str, flow: str, kind: str, round_: int, write: float, one: float, in_flow: float
) -> dict:
    return {
        "case": case,
        "flow": flow,
        "kind": kind,
        "round": round_,
        "write_ms": 1e3 * write,
        "send_ms": float("nan"),
        "copy_one_ms": 1e3 * one,
        "vs_copy": one / write,
        "copy_in_flow_ms": 1e3 * in_flow,
        "vs_copy_in_flow": in_flow / write,
    }


def headline(reps: int, rounds: int) -> None:
    """Only the headline column, in two flows per case: the write against one `copy_` of as
    many bytes timed alone on the GPU in the same process (`vs_copy`), in `rounds` series of
    `reps` (a median each). Short, so that several processes of two versions of the code can
    alternate on one machine: the spread between processes is larger than within one.

    - `stage order`, the target's flow: the order the stage actor uses
      (`Prefill.stage_order`): a model-sized forward queued, `send` on a side stream behind it,
      then `out.cpu()`. `write_ms` is the GPU's time from the forward's end to the copy's end,
      `copy_in_flow_ms` the same for a `copy_` in the place of `send`, `after_wait_ms` the
      host's time from `out.cpu()`'s return to Success.
    - `GPU idle`: send->Success, `send` straight from the bootstrap's sleep on the pipe to the
      decode process; `copy_in_flow_ms` is one `copy_` launched there and polled to its end
      (`Prefill.copy_in_flow`): what any launch from that state costs.
    """
    peer = decode_peer()
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    rows, checks = [], {}
    try:
        for name, tokens, run in CASES:
            local, remote, nbytes = case_pages(tokens, run)
            peer.reset()
            fast.transfer(local, remote, last=True)  # maps the peer, builds the route
            checks[name] = fast.check(local, remote)
            reference = OneCopy(nbytes)
            one = statistics.median(gpu_time(reference, reps))
            model = ModelForward(fast.cache, tokens)
            for round_ in range(rounds):
                in_flow = statistics.median(
                    fast.copy_in_flow(reference, remote) for _ in range(reps)
                )
                for last, kind in ((False, "KV only"), (True, "last stage")):
                    write, in_send = fast_series(fast, local, remote, reps, last)
                    rows.append(_headline_row(name, "GPU idle", kind, round_, write, one, in_flow))
                    rows[-1]["send_ms"] = 1e3 * in_send
                    print(rows[-1], file=sys.stderr, flush=True)
                # The stage's order: its kinds interleaved rep by rep (side by side), a `copy_`
                # in the place of `send` among them.
                ordered = side_by_side(
                    partial(fast.stage_order, model, local, remote), reference, reps
                )
                copy_gpu = statistics.median(g for g, _ in ordered["copy"])
                for kind in ("KV only", "last stage"):
                    write = statistics.median(g for g, _ in ordered[kind])
                    rows.append(
                        _headline_row(name, "stage order", kind, round_, write, one, copy_gpu)
                    )
                    rows[-1]["after_wait_ms"] = 1e3 * statistics.median(h for _, h in ordered[kind])
                    print(rows[-1], file=sys.stderr, flush=True)
            checks[f"{name}: after every flow"] = fast.check(local, remote)
            del model
            torch.cuda.empty_cache()
        backend = fast.endpoint.cuda_ipc.backend if fast.endpoint.cuda_ipc else None
        columns = [
            "case",
            "flow",
            "kind",
            "round",
            "write_ms",
            "send_ms",
            "copy_one_ms",
            "vs_copy",
            "copy_in_flow_ms",
            "vs_copy_in_flow",
            "after_wait_ms",
        ]
        write_report(
            "kv_transfer_headline",
            rows,
            columns,
            {
                "reps": reps,
                "checksums_equal": checks,
                "graphs_in_use": bool(getattr(backend, "graphs_in_use", False)),
            },
        )
        if not all(checks.values()):
            sys.exit("KV arrived corrupted")
    finally:
        fast.close()
        peer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30, help="fast path and copy repetitions")
    parser.add_argument("--mooncake-reps", type=int, default=4)
    parser.add_argument("--forward-reps", type=int, default=40, help="behind-a-forward pairs")
    parser.add_argument(
        "--headline",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only send->Success with the GPU idle, ROUNDS series per case (kv_transfer_headline)",
    )
    args = parser.parse_args()
    if args.headline:
        headline(args.reps, args.headline)
        return
    peer = decode_peer()
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    slow = Prefill(peer, TransportConfig(hostname="127.0.0.1", cuda_ipc=False), "tcp")
    light = LightForward(fast.cache)
    rows, checks = [], {}
    path = fast.endpoint.cuda_ipc
    assert path is not None
    try:
        for name, tokens, run in CASES:
            local, remote, nbytes = case_pages(tokens, run)
            row: dict = {"case": name, "MiB": nbytes / 2**20}

            peer.reset()
            sender, first_wall, _ = fast.transfer(local, remote, last=True)
            row["first_transfer_ms"] = 1e3 * first_wall  # includes opening the mappings
            row["mover"] = sender.stats.mover
            row["segments"] = sender.stats.segments
            checks[f"{name}: fast path"] = fast.check(local, remote)

            # send->Success with the GPU idle at `send`, no probes.
            for last, key in ((True, "fast"), (False, "fast_kv_only")):
                write, in_send = fast_series(fast, local, remote, args.reps, last)
                row[f"{key}_write_ms"] = 1e3 * write
                row[f"{key}_send_ms"] = 1e3 * in_send
                row[f"{key}_GB_s"] = nbytes / write / 1e9
            row["wait_ms"] = row["fast_kv_only_write_ms"] - row["fast_kv_only_send_ms"]

            # Behind a forward: what the transfer adds to the stage's own work, after a
            # model-sized (GPU-bound) forward and after a light (host-bound) one.
            model = ModelForward(fast.cache, tokens)
            for forward, prefix in ((model, ""), (light, "hostbound_")):
                row[f"{prefix}forward_gpu_ms"] = forward.gpu_ms(local)
                for last, key in ((True, "added"), (False, "added_kv_only")):
                    times = forward_series(fast, forward, local, remote, args.forward_reps, last)
                    added = times["forward_send"] - times["forward"]
                    key = prefix + key
                    row[f"{key}_ms"] = 1e3 * added
                    row[f"{key}_GB_s"] = nbytes / added / 1e9 if added > 0 else float("inf")
                    row[f"{key}_gpu_ms"] = 1e3 * times["gpu_added"]
                    done = times["done_to_success"]
                    row[f"{key}_done_to_success_ms"] = 1e3 * done
                    row[f"{key}_done_to_success_GB_s"] = nbytes / done / 1e9
                    if last:
                        row[f"{prefix}forward_ms"] = 1e3 * times["forward"]
                        row[f"{prefix}forward_send_ms"] = 1e3 * times["forward_send"]
            # The stage actor's order: sends on a side stream before the wait (the headline).
            ordered = side_by_side(
                partial(fast.stage_order, model, local, remote), OneCopy(nbytes), args.reps
            )
            for kind, key in (("KV only", "stage_order"), ("last stage", "stage_order_last")):
                landed = statistics.median(g for g, _ in ordered[kind])
                row[f"{key}_ms"] = 1e3 * landed
                row[f"{key}_GB_s"] = nbytes / landed / 1e9
                row[f"{key}_after_wait_ms"] = 1e3 * statistics.median(h for _, h in ordered[kind])
            row["stage_order_copy_ms"] = 1e3 * statistics.median(g for g, _ in ordered["copy"])
            del model, ordered
            checks[f"{name}: fast path behind a forward"] = fast.check(local, remote)

            # Where `send`'s time goes: KV-only runs with timers on each step and call.
            probes = call_probes(fast)
            phases = phase_probes(fast)
            fast_series(fast, local, remote, args.reps, last=True)
            row["record_ms"] = 1e3 * statistics.median(probes["record"].seconds)
            for probe in (*probes.values(), *phases.values()):
                probe.seconds.clear()
            probed, _ = fast_series(fast, local, remote, args.reps, last=False)
            row["probed_kv_only_write_ms"] = 1e3 * probed
            for key in ("plan", "launch", "launch_pages"):
                row[f"{key}_ms"] = 1e3 * statistics.median(probes[key].seconds)
            row.update(phase_medians(phases, "cold_"))
            restore_probes(phases)
            restore_probes(probes)

            # The same KV-only writes from a thread that was busy (not asleep) before `send`.
            write, in_send = fast_series(fast, local, remote, args.reps, False, spin_s=1e-3)
            row["busy_kv_only_write_ms"] = 1e3 * write
            row["busy_kv_only_send_ms"] = 1e3 * in_send
            row["busy_kv_only_GB_s"] = nbytes / write / 1e9

            peer.reset()
            sender, _, _ = slow.transfer(local, remote, last=True)
            checks[f"{name}: mooncake"] = slow.check(local, remote)
            writes = []
            for _ in range(args.mooncake_reps):
                sender, _, _ = slow.transfer(local, remote, last=True)
                assert sender.stats.mover == "mooncake"
                writes.append(sender.stats.seconds)
            row["mooncake_write_ms"] = 1e3 * statistics.median(writes)
            row["mooncake_GB_s"] = nbytes / statistics.median(writes) / 1e9

            copies = device_copies(fast.cache, local, remote, args.reps)
            torch.cuda.empty_cache()
            row["copy_one_GB_s"] = nbytes / copies["one_copy"] / 1e9
            row["copy_one_ms"] = 1e3 * copies["one_copy"]
            row["copy_one_alone_ms"] = 1e3 * copies["one_copy_busy"]
            row["pages_kernel_gpu_ms"] = 1e3 * copies["pages_kernel_gpu"]
            row["pages_kernel_GB_s"] = nbytes / copies["pages_kernel_gpu"] / 1e9
            row["pages_launch_to_done_GB_s"] = nbytes / copies["pages_kernel_host"] / 1e9
            row["copy_segments_GB_s"] = nbytes / copies["segments_kernel"] / 1e9
            for key in (
                "fast",
                "fast_kv_only",
                "busy_kv_only",
                "stage_order",
                "added",
                "added_kv_only",
                "hostbound_added",
                "hostbound_added_kv_only",
                "added_done_to_success",
                "added_kv_only_done_to_success",
                "hostbound_added_done_to_success",
                "hostbound_added_kv_only_done_to_success",
            ):
                row[f"{key}_vs_copy"] = row[f"{key}_GB_s"] / row["copy_one_GB_s"]
            row["fast_vs_mooncake"] = row["fast_GB_s"] / row["mooncake_GB_s"]
            row["target_vs_copy"] = 0.5
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        rows.append(profile_launch(fast))
        host_ipc = host_memory_ipc()
        columns = [
            "case",
            "MiB",
            "segments",
            "fast_GB_s",
            "fast_kv_only_GB_s",
            "added_GB_s",
            "added_kv_only_GB_s",
            "mooncake_GB_s",
            "copy_one_GB_s",
            "pages_kernel_GB_s",
            "fast_vs_copy",
            "fast_kv_only_vs_copy",
            "added_vs_copy",
            "added_kv_only_vs_copy",
            "hostbound_added_vs_copy",
            "hostbound_added_kv_only_vs_copy",
            "busy_kv_only_vs_copy",
            "stage_order_vs_copy",
            "stage_order_ms",
            "stage_order_copy_ms",
            "stage_order_after_wait_ms",
            "stage_order_last_after_wait_ms",
            "target_vs_copy",
            "fast_write_ms",
            "fast_send_ms",
            "fast_kv_only_write_ms",
            "fast_kv_only_send_ms",
            "added_done_to_success_vs_copy",
            "added_kv_only_done_to_success_vs_copy",
            "added_ms",
            "added_kv_only_ms",
            "added_done_to_success_ms",
            "added_kv_only_done_to_success_ms",
            "added_gpu_ms",
            "added_kv_only_gpu_ms",
            "forward_ms",
            "forward_gpu_ms",
            "hostbound_added_ms",
            "hostbound_added_kv_only_ms",
            "hostbound_added_done_to_success_ms",
            "hostbound_added_kv_only_done_to_success_ms",
            "hostbound_added_gpu_ms",
            "hostbound_added_kv_only_gpu_ms",
            "hostbound_forward_ms",
            "hostbound_forward_gpu_ms",
            "plan_ms",
            "launch_ms",
            "launch_pages_ms",
            "probed_kv_only_write_ms",
            "busy_kv_only_write_ms",
            "busy_kv_only_send_ms",
            "record_ms",
            "wait_ms",
            "copy_one_ms",
            "copy_one_alone_ms",
            "pages_kernel_gpu_ms",
            "first_transfer_ms",
        ]
        backend = path.backend
        write_report(
            "kv_transfer_gpu",
            rows,
            columns,
            {
                "shape": SHAPE.__dict__,
                "checksums_equal": checks,
                "reps": args.reps,
                "forward_reps": args.forward_reps,
                "host_memory_by_cuda_ipc": host_ipc,
                "graphs_in_use": isinstance(backend, CudaIpc) and backend.graphs_in_use,
                "graphs_record_events": bool(getattr(backend, "graphs_record_events", False)),
            },
        )
        print(
            "checksums equal:",
            checks,
            "graphs in use:",
            backend.graphs_in_use,
            "graphs record events:",
            getattr(backend, "graphs_record_events", None),
        )
        if not all(checks.values()):
            sys.exit("KV arrived corrupted")
    finally:
        fast.close()
        slow.close()
        peer.stop()


if __name__ == "__main__":
    main()
