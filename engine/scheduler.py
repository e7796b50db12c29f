"""Continuous batching with chunked prefill for a whole-model engine.

Two queues and three verbs, as in nano-vllm: `add`, `schedule`, `postprocess`. A step is all
prefill (chunks of waiting prompts under a token budget) or all decode (one token for every
running request). When decode runs out of pages the newest running request is preempted: its
pages are freed and it is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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

    def schedule(self) -> ScheduledStep | None:
        step = self._schedule_prefill()
        if step is not None:
            return step
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledStep | None:
        budget = self.max_num_batched_tokens
        seqs, chunks = [], []
        for seq in self.waiting:
            if budget == 0 or len(self.running) + len(seqs) >= self.max_num_seqs:
                break
            target = seq.num_tokens  # prompt, plus outputs when recomputing after preemption
            n = min(target - seq.num_computed_tokens, budget)
            if not self.allocator.can_allocate(
                seq.page_table.pages_to_grow(seq.num_computed_tokens + n)
            ):
                break
            seq.page_table.grow_to(seq.num_computed_tokens + n, self.allocator)
            done = seq.num_computed_tokens + n == target
            chunks.append(
                SeqChunk(seq.num_computed_tokens, n, seq.page_table.pages, wants_logits=done)
            )
            seqs.append(seq)
            budget -= n
        if not seqs:
            return None
        return ScheduledStep(seqs, chunks, is_prefill=True)

    def _schedule_decode(self) -> ScheduledStep | None:
        scheduled: list[Sequence] = []
        running = deque(self.running)
        allocator = self.allocator
        while running:
            seq = running.popleft()
            table = seq.page_table
            # The common case first: the next token still fits in the pages held.
            if seq.num_tokens <= table.capacity:
                scheduled.append(seq)
                continue
            while not allocator.can_allocate(table.pages_to_grow(seq.num_tokens)):
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                table.grow_to(seq.num_tokens, allocator)
                scheduled.append(seq)
        if not scheduled:
            return None
        chunks = [SeqChunk(s.num_computed_tokens, 1, s.page_table.pages) for s in scheduled]
        return ScheduledStep(scheduled, chunks, is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.page_table.release(self.allocator)
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
        seq.page_table.release(self.allocator)
