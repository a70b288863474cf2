"""Where a checkpoint's own image tokens are, for models that have them (no rows are appended).

- Chameleon family (config.json model_type "chameleon": Chameleon, Anole, Lumina-mGPT): read from
  `config.vocabulary_map`, where code c is named `IMGIMG<c with digits as letters A-J>Z`
  (transformers' `ChameleonImageVocabularyMapping.img2bpe`), laid out as Lumina-mGPT and the
  official ARRA code do (arra/data/item_processor_new.py, inference_solver.py):

      [BOS] caption <reserved08706> <racm3:break> <h> <w> [c_1 .. c_w <reserved08799>] x h <eoss> <reserved08706>

  <h> and <w> are `<reserved0{8800 + n}>`, n = cells of 2x2 codes (32 px) down and across. Their
  codes are those of Chameleon's VQGAN (arra-pipe's `chameleon` image tokenizer, 8192 codes). The
  final <reserved08706> is a target (the official sampler stops at it); the unconditional row is the
  sequence from <racm3:break> on, as the official sampler's CFG branch re-runs it ("from-boi").
- Any other checkpoint: a layout file `arra_layout.json` the user writes in its directory
  (fields in the README, "ARRA-Adapt from another checkpoint"):

      {"condition": "text", "tokenizer": "chameleon", "codebook_size": 8192, "grid": [32, 32],
       "image_ids": {"offset": 4}, "boi": 8197, "eoi": 8196,
       "before_boi": [8710], "after_boi": [8820, 8820], "newline": 8803, "after_eoi": [8710], "uncond": "from-boi"}

  `image_ids` is {"offset": first id} for consecutive ids, a list (the id of code 0, 1, ...), or
  the name of a text file beside it holding that list, one id a line. before_boi, after_boi,
  newline, after_eoi and uncond ("empty-caption", the default, or "from-boi") are optional.

Either is checked against the feature sets' image tokenizer (by name: a layout file cannot know
the weights' sha256), codebook and grid, and against the model's vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ArraError
from pipeline.lm.causal_lm import LAYOUT_FILE, is_chameleon
from pipeline.lm.vocab import UNCOND, ImageTokens, VocabLayout

LAYOUT_FILE_NAME = "arra_layout.json"
CHAMELEON_TOKENIZER = "chameleon"
BOI, EOI, SEP, NEWLINE = "<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>"
REQUIRED = ("tokenizer", "codebook_size", "grid", "image_ids", "boi", "eoi")


def size_token(codes: int) -> str:
    """Lumina-mGPT's token for an image side of `codes` codes: its count of 2-code cells."""
    return f"<reserved{8800 + codes // 2:05d}>"


def check_against_sets(source: str, declared: dict, tok: dict) -> None:
    """A checkpoint's image vocabulary (`declared`: tokenizer name, codebook_size, grid) against the
    sets' tokenizer `tok`: its codes must be the ones the model's image tokens stand for."""
    theirs = (declared["tokenizer"], declared["codebook_size"], list(declared["grid"]))
    if theirs != (tok["name"], tok["codebook_size"], list(tok["grid"])):
        raise ArraError(f"{source}: the model's image tokens are {theirs[1]} codes of image tokenizer {theirs[0]!r} on a "
                        f"{theirs[2]} grid, the sets have {tok['codebook_size']} codes of {tok['name']!r} on a "
                        f"{list(tok['grid'])} grid (extract them with --tokenizer {theirs[0]} at that grid)")


def lumina_tokens(vocabulary_map: dict | None, tok: dict, source: str) -> ImageTokens:
    """A Chameleon-family model's image tokens in Lumina-mGPT's layout, for the sets' tokenizer `tok`."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
    if not vocabulary_map:
        raise ArraError(f"{source}: config.json has no vocabulary_map to find the image tokens in; "
                        f"write a layout file {LAYOUT_FILE_NAME} beside it (see the README)")
    img2bpe = ChameleonImageVocabularyMapping(vocabulary_map).img2bpe
    h, w = tok["grid"]
    check_against_sets(source, {"tokenizer": CHAMELEON_TOKENIZER, "codebook_size": len(img2bpe), "grid": (h, w)}, tok)
    if h % 2 or w % 2:
        raise ArraError(f"{source}: Lumina-mGPT's size tokens count cells of 2x2 codes; the sets' grid {h}x{w} is odd")
    names = [SEP, BOI, EOI, NEWLINE, size_token(h), size_token(w)]
    missing = [n for n in names if n not in vocabulary_map]
    if missing or sorted(img2bpe) != list(range(len(img2bpe))):
        raise ArraError(f"{source}: vocabulary_map lacks {missing or 'IMGIMG names for codes 0..n-1'} of the Lumina-mGPT "
                        f"layout; write a layout file {LAYOUT_FILE_NAME} beside it (see the README)")
    sep, boi, eoi, newline, hh, ww = (vocabulary_map[n] for n in names)
    return ImageTokens(tuple(img2bpe[c] for c in range(len(img2bpe))), boi, eoi, (sep,), (hh, ww), newline, (sep,),
                       "from-boi")


def read_layout_file(file: Path, tok: dict) -> ImageTokens:
    """The image tokens a user's layout file declares, checked against the sets' tokenizer `tok`."""
    try:
        d = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArraError(f"{file}: not a JSON layout file ({e})") from None
    if not isinstance(d, dict):
        raise ArraError(f"{file}: a layout file is one JSON object (the README's example)")
    missing = [k for k in REQUIRED if k not in d]
    if missing or d.get("condition", "text") != "text" or d.get("uncond", UNCOND[0]) not in UNCOND:
        raise ArraError(f"{file}: a layout file needs {', '.join(REQUIRED)} (missing {missing}), condition "
                        f"\"text\" and uncond one of {', '.join(UNCOND)} if any (the README's \"ARRA-Adapt from "
                        f"another checkpoint\")")
    check_against_sets(str(file), d, tok)
    if isinstance(d["image_ids"], str):
        ids = file.parent / d["image_ids"]
        try:
            d["image_ids"] = [int(x) for x in ids.read_text().split()]
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ArraError(f"{ids} (image_ids of {file}): not a readable list of token ids ({e})") from None
    return ImageTokens.from_dict(d, d["codebook_size"])


def check_ids(tokens: ImageTokens, codebook_size: int, vocab_size: int, source: str) -> None:
    """One distinct token per code, all of them and the markers inside the model's vocabulary."""
    markers = [tokens.boi, tokens.eoi, *tokens.before_boi, *tokens.after_boi, *tokens.after_eoi]
    markers += [tokens.newline] if tokens.newline is not None else []
    problems = [text for text, bad in (
        (f"{len(tokens.ids)} image ids for {codebook_size} codes", len(tokens.ids) != codebook_size),
        ("an image id repeats", len(set(tokens.ids)) != len(tokens.ids)),
        (f"ids outside the model's {vocab_size} rows", not all(0 <= i < vocab_size for i in (*tokens.ids, *markers))),
        ("<boi>, <eoi>, newline or a size token is also an image id", bool(set(tokens.ids) & set(markers)))) if bad]
    if problems:
        raise ArraError(f"{source}: " + "; ".join(problems))


def check_init_dir(path: str) -> None:
    """`--init PATH` needs one of: an export of ours, a layout file, a Chameleon-architecture checkpoint."""
    p = Path(path)
    if not ((p / LAYOUT_FILE).is_file() or (p / LAYOUT_FILE_NAME).is_file() or is_chameleon(p)):
        raise ArraError(f"--init {path}: no {LAYOUT_FILE} (a directory written by `arra-pipe export`), no layout file "
                        f"{LAYOUT_FILE_NAME} (see the README) and not a Chameleon-architecture checkpoint")


def external_layout(path: str, tok: dict, tok_ref: dict, max_text_len: int) -> VocabLayout:
    """ARRA-Adapt from a checkpoint arra-pipe did not write: its layout file's image tokens, else (the
    Chameleon family) its vocabulary_map's, checked against the sets' tokenizer `tok` and the model."""
    from transformers import AutoConfig
    check_init_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    file = Path(path) / LAYOUT_FILE_NAME
    tokens = (read_layout_file(file, tok) if file.is_file()
              else lumina_tokens(getattr(config, "vocabulary_map", None), tok, f"--init {path}"))
    check_ids(tokens, tok["codebook_size"], config.vocab_size, str(file) if file.is_file() else f"--init {path}")
    pad = config.pad_token_id if config.pad_token_id is not None else -1
    return VocabLayout("text", config.vocab_size, tok["codebook_size"], tuple(tok["grid"]), tok_ref, pad, max_text_len,
                       native=tokens)
