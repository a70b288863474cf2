"""How image codes sit in the LM's vocabulary, and how a training sequence is laid out.

Appended layouts (ARRA-Base presets, ARRA on a text-only LM) give the codes new rows:

    vocabulary:  [ condition tokens | image codes (codebook_size) | <boi> | <eoi> (| <rep>) ]
    sequence:    condition  (<rep>)  <boi>  c_1 ... c_N  <eoi>   (N = grid h*w, row-major)

Native layouts (`ImageTokens`: a model that already has image rows, as Chameleon and Lumina-mGPT
do, or a checkpoint whose layout file declares them) append nothing: each code has its model's
token id from a table, and the image may carry the model's own tokens around it, as Lumina-mGPT's

    sequence:    condition  <sep>  <boi> <h> <w>  [c_1 .. c_w <newline>] x h  <eoi>  <sep>

where the final <sep> is a target like <eoi>, and the unconditional row (classifier-free guidance,
a dropped condition) is the sequence from <boi> on: no BOS, caption or <sep> (`ImageTokens.uncond`).

Condition tokens are either class tokens (one per label plus a null class used for classifier-free
guidance) or a text tokenizer's vocabulary. Labels cover everything after the prefix (codes,
newlines, <eoi>, a final <sep>); the positions that *predict* image codes come from this layout,
never from slicing the end of a padded batch. A layout with `rep` has the paper's dedicated <rep>
token between the condition and <boi>, whose hidden state `--align-positions rep-token` aligns: it has
seen the whole condition and predicts nothing (its next token, <boi>, is always given).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property

import numpy as np

from pipeline.errors import ArraError

# "empty-caption": the condition tokens of "" (the tokenizer's BOS, say), then the whole prefix;
# "from-boi": none of the prompt turn (its BOS, caption and before_boi), as Lumina-mGPT's and the official
# ARRA sampler's unconditional branch, which re-runs the model on the sequence from <boi> on
UNCOND = ("empty-caption", "from-boi")


@dataclass(frozen=True)
class ImageTokens:
    """A model's own image tokens: the token id of each code and the tokens around an image."""
    ids: tuple[int, ...]              # the token id of code 0, 1, ..., codebook_size - 1
    boi: int
    eoi: int
    before_boi: tuple[int, ...] = ()  # between the condition and <boi> (Lumina-mGPT's <sep>)
    after_boi: tuple[int, ...] = ()   # between <boi> and the first code (Lumina-mGPT's h and w size tokens)
    newline: int | None = None        # after each row of codes (Lumina-mGPT's <reserved08799>)
    after_eoi: tuple[int, ...] = ()   # after <eoi>, targets like it (Lumina-mGPT's closing <sep>)
    uncond: str = "empty-caption"     # the unconditional row: the empty caption's, or "from-boi" (Lumina-mGPT's)

    def to_dict(self) -> dict:
        """The fields of a layout file: the ids as {"offset": first} when they are consecutive."""
        d = asdict(self)
        first = d.pop("ids")[0]
        consecutive = self.ids == tuple(range(first, first + len(self.ids)))
        return {"image_ids": {"offset": first} if consecutive else list(self.ids),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: dict, codebook_size: int) -> "ImageTokens":
        ids = d["image_ids"]
        ids = range(ids["offset"], ids["offset"] + codebook_size) if isinstance(ids, dict) else ids
        return cls(tuple(int(i) for i in ids), int(d["boi"]), int(d["eoi"]), tuple(d.get("before_boi", ())),
                   tuple(d.get("after_boi", ())), d.get("newline"), tuple(d.get("after_eoi", ())),
                   d.get("uncond", "empty-caption"))


@dataclass(frozen=True)
class VocabLayout:
    condition: str          # "class" or "text"
    condition_vocab: int    # class: num_classes + 1 (the last is the null class); text: tokenizer rows; native: model rows
    codebook_size: int
    grid: tuple[int, int]
    tokenizer: dict         # the feature set's tokenizer reference: name, weights_sha256, resolution
    pad_id: int = -1        # text: the tokenizer's pad id; class: <eoi> (padding is masked anyway)
    max_text_len: int = 0   # text: caption tokens kept, in training and at sampling alike; class: 0
    rep: bool = False       # a <rep> token after the condition (--align-positions rep-token)
    native: ImageTokens | None = None  # the model's own image tokens; None: appended after the condition tokens
    rope: str = "1d"        # "2d": image codes turn by grid row and column (pipeline/lm/rope2d.py)

    def __post_init__(self):
        if self.native is not None and self.rep:
            raise ArraError("--align-positions rep-token appends a <rep> row, and a model with its own image tokens "
                            "gets none appended: align at image or boi")

    @property
    def image_offset(self) -> int | None:
        """Where an appended layout's codes start (None for a native one: see `code_ids`)."""
        return None if self.native else self.condition_vocab

    @cached_property
    def code_ids(self) -> np.ndarray:
        """The token id of each image code."""
        return np.array(self.native.ids if self.native else
                        range(self.condition_vocab, self.condition_vocab + self.codebook_size), dtype=np.int64)

    @property
    def boi(self) -> int:
        return self.native.boi if self.native else self.image_offset + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.native.eoi if self.native else self.boi + 1

    @property
    def newline(self) -> int | None:
        return self.native.newline if self.native else None

    @property
    def rep_token(self) -> int | None:
        return self.eoi + 1 if self.rep else None

    @property
    def drops_prompt(self) -> bool:
        """Whether the unconditional row starts at <boi> ("from-boi"): then before_boi closes the prompt
        turn it drops, so it belongs to the condition (`prompt_end`), not to the image prefix."""
        return self.native is not None and self.native.uncond == "from-boi"

    @property
    def prompt_end(self) -> list[int]:
        """The tokens a caption's ids are followed by (the condition's own; none when it is dropped)."""
        return list(self.native.before_boi) if self.drops_prompt else []

    @property
    def image_prefix(self) -> list[int]:
        """The tokens between the condition and the first image code, in training and sampling alike."""
        if self.native:
            return [*([] if self.drops_prompt else self.native.before_boi), self.boi, *self.native.after_boi]
        return [self.rep_token, self.boi] if self.rep else [self.boi]

    @property
    def image_suffix(self) -> list[int]:
        """<eoi> and what follows it: the targets after the last code."""
        return [self.eoi, *self.native.after_eoi] if self.native else [self.eoi]

    @cached_property
    def image_slots(self) -> np.ndarray:
        """The image after the prefix, up to <eoi>, slot by slot: True where a code goes (row-major),
        False where the layout's newline token closes a row."""
        h, w = self.grid
        return np.tile(np.r_[np.ones(w, bool), np.zeros(int(self.newline is not None), bool)], h)

    @property
    def tail_len(self) -> int:
        """Tokens after the caption's: the prompt's end, prefix, image, <eoi> and what follows it."""
        return len(self.prompt_end) + len(self.image_prefix) + len(self.image_slots) + len(self.image_suffix)

    @property
    def vocab_size(self) -> int:
        return self.condition_vocab if self.native else self.eoi + 1 + self.rep

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def null_class(self) -> int:
        return self.condition_vocab - 1

    @property
    def pad(self) -> int:
        return self.eoi if self.pad_id < 0 else self.pad_id

    def to_dict(self) -> dict:
        """arra_vocab.json; an appended layout's is as before native layouts existed."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "native"}
        d.update(grid=list(self.grid), boi=self.boi, eoi=self.eoi, vocab_size=self.vocab_size)
        if self.native:
            d["native"] = self.native.to_dict()
        else:
            d["image_offset"] = self.image_offset
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        native = ImageTokens.from_dict(d["native"], d["codebook_size"]) if d.get("native") else None
        return cls(d["condition"], d["condition_vocab"], d["codebook_size"], tuple(d["grid"]), d["tokenizer"],
                   d.get("pad_id", -1), d.get("max_text_len", 0), d.get("rep", False), native, d.get("rope", "1d"))
