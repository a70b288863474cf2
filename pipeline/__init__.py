"""arra-pipe library, by folder: `data` (sources, feature-set format, readers), `models` (frozen
teachers and image tokenizers), `lm` (the LM, vocabulary layout, ARRA objective, generation) and
`metrics`; errors, options and distributed set-up are shared by all of them."""

__version__ = "0.1.0"
