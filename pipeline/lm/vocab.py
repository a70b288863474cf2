"""How image codes sit in the LM's vocabulary, and how a training sequence is laid out.

    vocabulary:  [ condition tokens | image codes (codebook_size) | <boi> | <eoi> (| <rep>) ]
    sequence:    condition  (<rep>)  <boi>  c_1 ... c_N  <eoi>   (N = grid h*w, row-major)

Condition tokens are either class tokens (one per label plus a null class used for classifier-free
guidance) or a text tokenizer's vocabulary. Labels cover the image codes and <eoi>; the
positions that *predict* image codes (<boi> .. c_{N-1}) come from this layout, never from
slicing the end of a padded batch. A layout with `rep` has the paper's dedicated <rep> token
between the condition and <boi>, whose hidden state `--align-positions rep-token` aligns: it has
seen the whole condition and predicts nothing (its next token, <boi>, is always given).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class VocabLayout:
    condition: str          # "class" or "text"
    condition_vocab: int    # class: num_classes + 1 (the last is the null class); text: tokenizer rows
    codebook_size: int
    grid: tuple[int, int]
    tokenizer: dict         # the feature set's tokenizer reference: name, weights_sha256, resolution
    pad_id: int = -1        # text: the tokenizer's pad id; class: <eoi> (padding is masked anyway)
    max_text_len: int = 0   # text: caption tokens kept, in training and at sampling alike; class: 0
    rep: bool = False       # a <rep> token after the condition (--align-positions rep-token)

    @property
    def image_offset(self) -> int:
        return self.condition_vocab

    @property
    def boi(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.boi + 1

    @property
    def rep_token(self) -> int | None:
        return self.eoi + 1 if self.rep else None

    @property
    def image_prefix(self) -> list[int]:
        """The tokens between the condition and the first image code, in training and sampling alike."""
        return [self.rep_token, self.boi] if self.rep else [self.boi]

    @property
    def vocab_size(self) -> int:
        return self.eoi + 1 + self.rep

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
        d = asdict(self)
        d.update(grid=list(self.grid), image_offset=self.image_offset, boi=self.boi, eoi=self.eoi,
                 vocab_size=self.vocab_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        return cls(d["condition"], d["condition_vocab"], d["codebook_size"], tuple(d["grid"]), d["tokenizer"],
                   d.get("pad_id", -1), d.get("max_text_len", 0), d.get("rep", False))
