"""arra-pipe library: feature-set format, sources, tokenizers, teachers."""

__version__ = "0.1.0"
