"""Structured output: grammars that mask each step's logits, through llguidance.

Why llguidance (over xgrammar): MIT, one 3 MB wheel with no dependencies (xgrammar pulls torch,
transformers and triton), so the ingress compiles and validates grammars without torch; its
mask costs tens of microseconds per token on a 49k vocabulary (`make bench` measures it here).

The ingress turns `response_format` and vLLM's `guided_*` fields into one llguidance grammar
string (`compile_grammar`) and checks it against the model's tokenizer (`grammar_problem`), so a
bad schema is a 400 before anything is allocated. The sampling processes (the last prefill stage
for the first token, decode for the rest) each build a `GrammarState` from that string; decode
rebuilds its state by consuming the first token, so no matcher state crosses processes.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import llguidance
    import torch

    from engine.tokenizer import Tokenizer


# JSON comes out compact, ", " and ": " between items: flexible whitespace lets a model pad
# forever (a known way for constrained decoding to run to max_tokens), and no parser needs it.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar the request asked for cannot be built."""


def compile_grammar(kind: str, spec: Any) -> str:
    """The llguidance grammar for one request's constraint.

    `kind`: "json_schema" (a schema dict or its JSON text), "json_object" (any JSON object),
    "regex", "choice" (one of some strings), "lark" (a Lark grammar)."""
    from llguidance import LLMatcher

    try:
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, _JSON_LAYOUT)
        if kind == "json_schema":
            schema = json.loads(spec) if isinstance(spec, str) else spec
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema is an object")
            return LLMatcher.grammar_from_json_schema(schema, _JSON_LAYOUT)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            if not spec or not all(isinstance(c, str) and c for c in spec):
                raise GrammarError("guided_choice takes non-empty strings")
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec))
        if kind == "lark":
            return LLMatcher.grammar_from_lark(spec)
    except GrammarError:
        raise
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from exc
    raise GrammarError(f"unknown grammar kind {kind!r}")


def grammar_problem(grammar: str, tokenizer: Tokenizer, vocab_size: int) -> str | None:
    """Why `grammar` cannot constrain this model (None: it can)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar, grammar_tokenizer(tokenizer, vocab_size))
    return error or None


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (about a second to build; one per process)."""
    return _ll_tokenizer(tokenizer.backend.to_str(), vocab_size, tuple(tokenizer.eos_token_ids))


@lru_cache(maxsize=2)
def _ll_tokenizer(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]) -> Any:
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos) or None)


class GrammarState:
    """One request's position in its grammar: which tokens may come next, and whether the
    grammar is complete."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def advance(self, token: int) -> None:
        """Takes the sampled token (masked sampling only picks allowed ones)."""
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete (only EOS may follow), or it broke."""
        return self._matcher.is_stopped() or self._matcher.is_error()


def mask_rows(logits: torch.Tensor, rows: list[tuple[int, GrammarState]]) -> None:
    """Masks rows of `logits` [B, V] in place, row `i` by its grammar state: the matchers' bitmasks
    side by side, then one `where` over the batch (a masked fill per row cost four times as
    much at batch 32). The bitmasks are computed one after the other: llguidance's thread pool
    (`LLExecutor`) was three times slower than that on a 2-core machine, at about 25 us a row."""
    import numpy as np
    import torch

    if not rows:
        return
    vocab = logits.shape[-1]
    width = -(-vocab // 32) * 4  # bytes: one bit per token, in int32 words
    bitmask = np.empty((len(rows), width), dtype=np.uint8)
    for j, (_, state) in enumerate(rows):
        bitmask[j] = np.frombuffer(state._matcher.compute_bitmask(), dtype=np.uint8)[:width]
    # Bit b of int32 word w allows token 32 w + b: little-endian bytes, little-endian bits.
    bits = np.unpackbits(bitmask, axis=1, count=vocab, bitorder="little")
    allowed = torch.from_numpy(bits.view(np.bool_)).to(logits.device)
    forbidden = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    index = [i for i, _ in rows]
    if index == list(range(logits.shape[0])):
        torch.where(allowed, logits, forbidden, out=logits)
        return
    picked = torch.tensor(index, dtype=torch.long, device=logits.device)
    logits[picked] = torch.where(allowed, logits[picked], forbidden)
