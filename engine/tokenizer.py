"""Tokenizer and chat template of a local Hugging Face model directory (or GGUF file).

`tokenizer.json` is run by the `tokenizers` library; the chat template comes from
`chat_template.jinja` (transformers 5 layout) or `tokenizer_config.json`, and is rendered with
a sandboxed Jinja environment configured the way transformers renders it. A GGUF file carries
both in its metadata; engine/gguf.py rebuilds them from there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from engine.errors import ModelLoadError
from engine.gguf import find_gguf, tokenizer_from_gguf


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template (bad roles, order, ...)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        eos = {backend.token_to_id(eos_token)} if eos_token else set()
        self.eos_token_ids = tuple(
            sorted(i for i in eos | set(extra_eos_token_ids) if i is not None)
        )

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, extra_eos_token_ids: tuple[int, ...] = ()
    ) -> Tokenizer:
        path = Path(model_dir)
        if (gguf_file := find_gguf(path)) is not None:
            parts = tokenizer_from_gguf(gguf_file)
            return cls(
                parts.backend,
                chat_template=parts.chat_template,
                bos_token=parts.bos_token,
                eos_token=parts.eos_token,
                extra_eos_token_ids=tuple(set(extra_eos_token_ids) | set(parts.eos_token_ids)),
            )
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(
                f"{path} has no tokenizer.json (only fast tokenizers in tokenizer.json are supported)"
            )
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise ModelLoadError(f"cannot load {tok_file}: {exc}") from exc
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        gen_cfg = path / "generation_config.json"
        extra = set(extra_eos_token_ids)
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            extra.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            extra_eos_token_ids=tuple(extra),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text on its own, special tokens included (logprobs name tokens so)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def decode_stream(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        assert self.chat_template is not None
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use the completions API")
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer.backend, token_id) or ""
