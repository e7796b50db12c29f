"""Continuous batching with chunked prefill for a whole-model engine.

Two queues and three verbs, as in nano-vllm: `add`, `schedule`, `postprocess`. A step is all
prefill (chunks of waiting prompts under a token budget) or all decode (one token for every
running request). When decode runs out of pages the newest running request is preempted: its
pages are freed and it is recomputed later from its prompt and the tokens it already produced.

Async scheduling (engine/llm.py) plans a decode step while the previous one still runs on the
device and its sampled tokens are unknown to the host. `schedule(overlapped=True)` plans only
what needs none of them: a decode step of the running requests, leaving out those whose pending
token is their last by length; it returns None when the step would admit prompts or preempt,
and the engine then drains the pipeline and schedules as the synchronous loop would. Pages freed
while a step may still read or write them (`step_launched`) are held until it has ended
(`step_done`), so no other request, nor the KV transport, gets a page a running kernel touches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from math import inf

from engine.attention import SeqChunk
from engine.errors import OutOfPagesError
from engine.page_allocator import PageAllocator
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    chunks: list[SeqChunk]
    is_prefill: bool

    def input_token_ids(self) -> list[int]:
        if not self.is_prefill:  # decode: each request's newest token, whose K/V is not cached
            return [seq.last_token_id for seq in self.seqs]
        ids: list[int] = []
        for seq, chunk in zip(self.seqs, self.chunks, strict=True):
            ids.extend(seq.token_ids(chunk.start, chunk.start + chunk.num_new))
        return ids


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: float = inf,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Steps whose device work may still run: ids up to `_launched`, all done up to `_done`;
        # pages freed meanwhile wait in `_held` beside the newest step id they must outlive.
        self._launched = 0
        self._done = 0
        self._held: deque[tuple[int, list[int]]] = deque()

    @property
    def num_held_pages(self) -> int:
        """Pages of finished or preempted requests waiting for a step in flight to end."""
        return sum(len(pages) for _, pages in self._held)

    def step_launched(self) -> int:
        """A step's device work was queued; returns its id. Pages freed from now on are held
        until `step_done` of this id (or a later one)."""
        self._launched += 1
        return self._launched

    def step_done(self, step_id: int) -> None:
        """Every step up to `step_id` has ended on the device: free the pages held for them."""
        self._done = max(self._done, step_id)
        while self._held and self._held[0][0] <= self._done:
            self.allocator.free(self._held.popleft()[1])

    def add(self, seq: Sequence) -> None:
        needed = seq.page_table.pages_to_grow(seq.num_tokens)
        if needed > self.allocator.num_pages:
            raise OutOfPagesError(
                f"request {seq.rid} needs {needed} KV pages, the cache has {self.allocator.num_pages}"
            )
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Join the decode batch directly: the prompt's KV is already in the sequence's pages."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.rid == rid:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORT)
                    return seq
        return None

    def schedule(self, overlapped: bool = False) -> ScheduledStep | None:
        """The next step, or None when there is nothing to run. `overlapped`: a step is in
        flight whose sampled tokens the host has not read; then only a decode step that needs
        neither them nor a preemption is planned, and None also means "drain, then ask again"."""
        if overlapped:
            if self.waiting and self._prefill_size(self.waiting[0], self.max_num_batched_tokens):
                return None
            return self._schedule_decode(overlapped=True)
        step = self._schedule_prefill()
        if step is not None:
            return step
        return self._schedule_decode()

    def _prefill_size(self, seq: Sequence, budget: int, num_new_seqs: int = 0) -> int:
        """Tokens of `seq` the prefill step being planned can take now: 0 if none."""
        if budget == 0 or len(self.running) + num_new_seqs >= self.max_num_seqs:
            return 0
        # The prompt, plus outputs when recomputing after preemption.
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        needed = seq.page_table.pages_to_grow(seq.num_computed_tokens + n)
        return n if self.allocator.can_allocate(needed) else 0

    def _schedule_prefill(self) -> ScheduledStep | None:
        budget = self.max_num_batched_tokens
        seqs, chunks = [], []
        for seq in self.waiting:
            n = self._prefill_size(seq, budget, len(seqs))
            if n == 0:
                break
            seq.page_table.grow_to(seq.num_computed_tokens + n, self.allocator)
            done = seq.num_computed_tokens + n == seq.num_tokens
            scores_prompt = (
                seq.params.prompt_logprobs is not None
                and len(seq.prompt_logprobs) < len(seq.prompt_token_ids) - 1
            )
            chunks.append(
                SeqChunk(
                    seq.num_computed_tokens,
                    n,
                    seq.page_table.pages,
                    wants_logits=done,
                    all_logits=scores_prompt,
                )
            )
            seqs.append(seq)
            budget -= n
        if not seqs:
            if not self.running and self.waiting and self._restart_partial_prefills():
                return self._schedule_prefill()
            return None
        return ScheduledStep(seqs, chunks, is_prefill=True)

    def _restart_partial_prefills(self) -> bool:
        """Nothing runs and the first waiting prompt cannot get pages: other waiting prompts
        hold them, part-way through a chunked prefill (or a recompute). Restart those, newest
        first, until the first fits; without this every page can end up held by half-done
        prompts and nothing ever runs again. Returns whether any pages were freed."""
        head = self.waiting[0]
        freed = False
        for seq in reversed(self.waiting):
            if seq is head or self._prefill_size(head, self.max_num_batched_tokens):
                break
            if seq.page_table.pages:
                self._release(seq)
                seq.num_computed_tokens = 0
                freed = True
        return freed

    def _schedule_decode(self, overlapped: bool = False) -> ScheduledStep | None:
        scheduled: list[Sequence] = []
        running = deque(self.running)
        allocator = self.allocator
        while running:
            seq = running.popleft()
            if seq.num_pending and self._ends_with_pending(seq):
                continue  # its pending token is its last: no step for it (async scheduling)
            table = seq.page_table
            # The step feeds the token at position num_computed_tokens: the newest sampled one
            # (on the host, or pending on the device), whose K/V is not cached yet.
            needed = seq.num_computed_tokens + 1
            # The common case first: the next token still fits in the pages held.
            if needed <= table.capacity:
                scheduled.append(seq)
                continue
            if overlapped and not allocator.can_allocate(table.pages_to_grow(needed)):
                return None  # preempting needs the pending tokens (and frees pages): drain
            while not allocator.can_allocate(table.pages_to_grow(needed)):
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                table.grow_to(needed, allocator)
                scheduled.append(seq)
        if not scheduled:
            return None
        chunks = [SeqChunk(s.num_computed_tokens, 1, s.page_table.pages) for s in scheduled]
        return ScheduledStep(scheduled, chunks, is_prefill=False)

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """Whether the request stops by length once its pending tokens are appended."""
        total = seq.num_tokens + seq.num_pending
        return total - seq.num_prompt_tokens >= seq.params.max_tokens or total >= self.max_model_len

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, step: ScheduledStep) -> None:
        """Advance progress after a forward; sampling and stop checks happen in the engine."""
        for seq, chunk in zip(step.seqs, step.chunks, strict=True):
            seq.num_computed_tokens += chunk.num_new
            if step.is_prefill and chunk.wants_logits:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the request's pages now, or once the newest step in flight has ended."""
        table = seq.page_table
        if self._launched == self._done:
            table.release(self.allocator)
        elif table.pages:
            pages, table.pages = table.pages, []  # a new list: the old one names the request
            self._held.append((self._launched, pages))
