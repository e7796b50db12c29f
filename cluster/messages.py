"""Everything that crosses a process boundary between pdserve's roles, in one place.

Between roles (Serve calls): ingress -> decode `DecodeRequest`, answered by a stream of
`Accepted` then `TokenChunk`s; decode -> prefill `PrefillRequest`, answered by `Accepted` then a
`PrefillResult`. `Accepted` comes first on every such stream: the caller's bounded wait for a
replica ends there (`deployments.admission`).

Between a prefill controller and its stages (Ray actor calls): one `StepPlan` per scheduler
step, the same to every stage in the same call, applied in a fixed order (admissions, receiver
info, drops, reconcile, consensus tick, forward, KV sends), answered by one `StageReport` per
stage carrying its `TickResult`s (`cluster.consensus`).

Between neighbouring stages (`cluster.hidden_channel`): at connect time, per generation of the
stage group, the consumer's `HiddenSlots`, answered by the producer's `HiddenLink`; every step,
a `HiddenHandoff` from stage k to stage k+1 inside the chained step calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # messages pass through processes without torch (ingress, controller)
    import torch

from engine.sampling_params import SamplingParams
from transport.metadata import FirstToken
from transport.receiver_info import IpcAllocation, ReceiverInfo


@dataclass(frozen=True)
class Accepted:
    """The first item of every stream between roles: a replica has taken the request."""


@dataclass(frozen=True)
class DecodeRequest:
    """What the ingress asks a decode replica for: a validated, tokenized request."""

    rid: str
    room: int
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class TokenChunk:
    """What the decode stream yields: new tokens, their text, and the end when it comes."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    # Per token, when asked: its most likely alternatives, (token id, logprob).
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    # On a request's first chunk, when asked: its prompt's tokens after the first, each
    # (token id, logprob, alternatives).
    prompt_logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] | None = None
    index: int = 0  # which of the request's n choices (`SamplingParams.n`) it belongs to


@dataclass(frozen=True)
class PrefillRequest:
    """What the caller asks a prefill replica for: compute the KV of a prompt and ship it."""

    rid: str
    room: int
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The decode side's receiver info, when the caller has it already (the usual case: the
    # decode replica allocates first, then asks for the prefill with its info attached).
    receiver_info: ReceiverInfo | None = None
    # The decode replica's Ray actor name: the prefill side checks it is alive before it
    # counts an unreachable session against its own health.
    decode_replica: str | None = None


@dataclass(frozen=True)
class PrefillResult:
    """A prefilled request: its first token, and the Mooncake session of every stage that
    wrote its KV."""

    rid: str
    first_token: FirstToken
    stage_sessions: list[str]
    phases: dict[str, float] = field(default_factory=dict)  # the prefill side's timeline


@dataclass(frozen=True)
class ChunkPlan:
    """One request's part of a step's micro-batch (chunked prefill)."""

    rid: str
    start: int
    token_ids: list[int]
    pages: list[int]
    finishing: bool  # the prompt's last chunk: send the KV, and the sampled first token
    room: int = 0
    sampling: SamplingParams | None = None
    # The whole prompt, on a finishing chunk whose sampling reads it (repetition penalty).
    prompt_token_ids: tuple[int, ...] = ()
    # Echo with logprobs: the last stage scores the chunk's prompt tokens, with this many top
    # alternatives each; `next_token` is the prompt token after a chunk that does not finish.
    prompt_logprobs: int | None = None
    next_token: int | None = None


@dataclass(frozen=True)
class StepPlan:
    """Everything every stage applies in one step, identical on every rank."""

    step: int
    tick: int | None  # a consensus tick over `rids`, or None while the last one is unreported
    rids: tuple[str, ...] = ()  # the consensus list: bootstrap queue then inflight, in order
    admit: tuple[tuple[str, int], ...] = ()  # (rid, room)
    infos: tuple[tuple[str, ReceiverInfo], ...] = ()
    drop: tuple[tuple[str, str], ...] = ()  # (rid, reason)
    tracked: tuple[str, ...] | None = None  # set: reconcile against it
    batch: tuple[ChunkPlan, ...] = ()


@dataclass(frozen=True)
class TickResult:
    """One consensus tick as one rank saw it: the agreed vector and its own failure reasons."""

    tick: int
    vector: tuple[int, ...]
    failure_reasons: dict[str, str]


@dataclass
class StageReport:
    """One stage's answer to a plan."""

    pp_rank: int
    ticks: list[TickResult]  # ticks this rank finished since its last report
    last_tick: int  # the newest tick this rank has applied
    num_requests: int
    pages_in_use: int
    first_tokens: dict[str, FirstToken] = field(default_factory=dict)
    # The last stage's scores of this step's prompt chunks (echo with logprobs), per request.
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
    forward_seconds: float = 0.0
    consensus_seconds: float = 0.0


HiddenPathName = Literal["host", "ipc", "mooncake"]


@dataclass(frozen=True)
class HiddenSlots:
    """A consumer stage's input slots, offered to its producer once per generation: a ring of
    `num_slots` buffers of `rows x hidden_size` in `dtype`, each reachable by CUDA IPC (same
    node), by a Mooncake write (any node), or neither (the consumer's reason in `why`)."""

    node_id: str
    device: str  # "cpu" or "cuda:<i>" as the consumer sees it
    device_uuid: str | None
    num_slots: int
    rows: int
    hidden_size: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    addresses: tuple[int, ...]  # each slot's address in the consumer's address space
    session_id: str | None = None  # the consumer's Mooncake session, if its slots are registered
    ipc: IpcAllocation | None = None  # the allocation holding the slots, if exported
    consumed_events: tuple[bytes, ...] = ()  # per slot: recorded once the consumer copied it out
    why: str = ""  # why a path is missing

    @property
    def slot_nbytes(self) -> int:
        return self.rows * self.hidden_size * self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class HiddenLink:
    """The producer's answer to `HiddenSlots`: the path it chose, why, and (CUDA IPC) its
    per-slot "produced" events the consumer waits on."""

    path: HiddenPathName
    why: str
    produced_events: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class HiddenHandoff:
    """Stage k's hidden states for stage k+1, carried by the chained step call: the states
    themselves (`host`), or which of the consumer's slots holds the first `num_tokens` rows."""

    path: HiddenPathName
    num_tokens: int
    slot: int | None = None
    tensor: torch.Tensor | None = None  # the host path only (a CPU tensor)


class StagePlanError(RuntimeError):
    """Stages answered a plan inconsistently: the instance's invariants are broken."""
