"""Structured output in the engine: grammars from llguidance mask every sampled token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.grammar import GrammarError, GrammarState, compile_grammar, grammar_problem

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
    row = torch.zeros(llm.model_config.vocab_size)
    state.mask(row)
    allowed = torch.isfinite(row).nonzero().flatten().tolist()
    assert allowed and all(llm.tokenizer.token_text(t) == "x" for t in allowed)


def test_bad_grammars_are_refused_before_serving(llm) -> None:
    with pytest.raises(GrammarError):
        compile_grammar("json_schema", "[1, 2]")
    with pytest.raises(GrammarError):
        compile_grammar("choice", [])
    bad = compile_grammar("regex", "(unclosed")
    assert grammar_problem(bad, llm.tokenizer, llm.model_config.vocab_size)
