"""Errors the engine raises for bad models and bad requests, each with a message a user can act on."""


class ModelLoadError(ValueError):
    """A model directory or checkpoint cannot be loaded: missing file, bad config, wrong shapes."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint names an architecture or feature pdserve does not implement."""


class OutOfPagesError(RuntimeError):
    """The page allocator cannot hand out the pages asked for."""


class PageAccountingError(RuntimeError):
    """A page was freed twice or never allocated: a bug in the caller, never ignored."""


class GGUFFormatError(ModelLoadError):
    """A `.gguf` file cannot be parsed: not GGUF at all, truncated, or corrupt."""


class UnsupportedGGUFError(UnsupportedModelError):
    """A GGUF file is well-formed but uses an architecture, tokenizer or tensor type pdserve lacks."""
