"""Structured output in the engine: grammars from llguidance mask every sampled token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.grammar import (
    GrammarError,
    GrammarState,
    compile_grammar,
    grammar_problem,
    mask_rows,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(EngineConfig(model=str(llama_dir), num_pages=128))


def generate(llm: LLM, grammar: str, seed: int, async_scheduling: bool = False) -> tuple:
    llm.async_scheduling = async_scheduling
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, grammar=grammar)
    [c] = llm.generate([[3, 17, 250, 9]], params)
    return c.text, c.finish_reason.value


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_json_schema_output_validates(llm, async_scheduling) -> None:
    grammar = compile_grammar("json_schema", SCHEMA)
    for seed in range(4):
        text, finish = generate(llm, grammar, seed, async_scheduling)
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert llm.allocator.num_in_use == 0


def test_choice_and_regex(llm) -> None:
    choice = compile_grammar("choice", ["left", "right side"])
    regex = compile_grammar("regex", "[a-f]{4}[0-9]")
    for seed in range(3):
        assert generate(llm, choice, seed)[0] in ("left", "right side")
        assert re.fullmatch("[a-f]{4}[0-9]", generate(llm, regex, seed)[0])


def test_the_mask_leaves_only_allowed_tokens(llm) -> None:
    state = GrammarState(llm.tokenizer, llm.model_config.vocab_size, compile_grammar("regex", "x"))
    row = torch.zeros(1, llm.model_config.vocab_size)
    mask_rows(row, [(0, state)])
    allowed = torch.isfinite(row[0]).nonzero().flatten().tolist()
    assert allowed and all(llm.tokenizer.token_text(t) == "x" for t in allowed)


def test_bad_grammars_are_refused_before_serving(llm) -> None:
    with pytest.raises(GrammarError):
        compile_grammar("json_schema", "[1, 2]")
    with pytest.raises(GrammarError):
        compile_grammar("choice", [])
    bad = compile_grammar("regex", "(unclosed")
    assert grammar_problem(bad, llm.tokenizer, llm.model_config.vocab_size)


def test_a_batch_is_masked_row_by_row_as_each_matcher_allows(llm) -> None:
    """`mask_rows` fills every row's bitmask at once: each row gets its own matcher's mask,
    rows without a grammar are left alone."""
    import numpy as np

    vocab = llm.model_config.vocab_size
    grammar = compile_grammar("json_schema", SCHEMA)
    states = [GrammarState(llm.tokenizer, vocab, grammar) for _ in range(3)]
    for text in ('{"name": "ab', '{"name": "a", "n": 4'):  # rows 1 and 2 at other places
        state = states[1 if text.endswith("ab") else 2]
        for token in llm.tokenizer.encode(text):
            state.advance(token)
    logits = torch.randn(5, vocab)
    before = logits.clone()
    mask_rows(logits, [(0, states[0]), (2, states[1]), (4, states[2])])
    for row, state in ((0, states[0]), (2, states[1]), (4, states[2])):
        bits = np.frombuffer(state._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:vocab].astype(bool))
        assert torch.equal(logits[row][allowed], before[row][allowed])
        assert torch.isinf(logits[row][~allowed]).all() and 0 < allowed.sum() < vocab
    assert torch.equal(logits[[1, 3]], before[[1, 3]])
