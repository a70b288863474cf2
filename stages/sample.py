"""`arra-pipe sample`: generate images from an exported model (or a run directory).

Writes one PNG per image, `grid.png`, and `samples.jsonl` with the condition, seed and sampling
settings of every image; codes are decoded by the image tokenizer named in `arra_vocab.json`,
whose weights must match the recorded sha256. A caption-features model encodes the prompts with
the caption encoder it records (found, and checked by sha256, as at extraction), and its guidance
branch is its learned unconditional caption embedding.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.errors import ArraError
from pipeline.lm.caption_prefix import load_embedder, right_aligned
from pipeline.lm.generate import generate
from pipeline.lm.causal_lm import LAYOUT_FILE, load_lm
from pipeline.lm.rope2d import install
from pipeline.data.samples import SAMPLES
from pipeline.lm.sampling import Sampling
from pipeline.models.image_tokenizers import load_recorded_tokenizer
from pipeline.data.train_data import Conditioner
from pipeline.lm.vocab import VocabLayout


BATCH_SIZE = {"cuda": 64, "cpu": 16}  # per device type: a GPU needs wide batches to be busy at each step


def save_grid(images: list[np.ndarray], path: Path, cols: int | None = None) -> None:
    """Tile images row by row (`cols` per row; square-ish by default) on a white background."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    h, w, _ = images[0].shape
    grid = np.full((math.ceil(n / cols) * h, cols * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray(grid).save(path)


def sample(model_path: str, out: str, prompts: list[str] | None = None, classes: list[int] | None = None,
           n: int = 1, sampling: Sampling = Sampling(), seed: int = 0, batch_size: int | None = None, device: str = "cpu",
           tokenizer_path: str | None = None, progress: bool = True, caption_encoder_path: str | None = None) -> Path:
    from transformers import AutoTokenizer
    model_dir, out = Path(model_path), Path(out)
    if not ((model_dir / LAYOUT_FILE).exists() and (model_dir / "config.json").exists()):
        raise ArraError(f"{model_dir}: not an exported model (config.json + {LAYOUT_FILE}); `arra-pipe export` makes one")
    meta = json.loads((model_dir / LAYOUT_FILE).read_text())
    layout = VocabLayout.from_dict(meta)
    dev = torch.device(device)
    batch_size = batch_size or BATCH_SIZE[dev.type]
    model = load_lm(model_dir, torch.bfloat16 if dev.type == "cuda" else torch.float32).to(dev).eval()
    if layout.rope == "2d":  # the export is a plain Llama; its positions over the grid come from the layout
        install(model, layout)
    text_tok = AutoTokenizer.from_pretrained(model_dir) if layout.condition == "text" else None
    conditioner = Conditioner(layout, text_tok, layout.max_text_len or 64)  # 64: models exported before it was recorded
    embedder, encoder = (caption_prefix(model, model_dir, meta, caption_encoder_path, dev)
                         if layout.condition == "caption-features" else (None, None))
    if layout.condition == "class":
        if prompts:
            raise ArraError("this model is class-conditioned: give --class, not --prompt/--prompts")
        classes = classes if classes else list(range(layout.null_class))
        bad = [c for c in classes if not 0 <= c < layout.null_class]
        if bad:
            raise ArraError(f"--class {bad} outside 0..{layout.null_class - 1}")
        wanted = [("class", c, [c]) for c in classes]
    else:
        if not prompts or classes:
            raise ArraError("this model is text-conditioned: give --prompt or --prompts, not --class")
        wanted = [("prompt", p, ids) for p, ids in zip(prompts, encoder.rows(prompts) if encoder else conditioner.encode(prompts))]
    jobs = [(kind, value, ids) for kind, value, ids in wanted for _ in range(n)]
    image_tok = load_recorded_tokenizer(meta["tokenizer"], tokenizer_path, dev)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, records = [], []
    for start in tqdm(range(0, len(jobs), batch_size), unit="batch", desc="sample", disable=not progress):
        batch = jobs[start:start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        conditions = [ids for _, _, ids in batch]
        with feeding(embedder, conditions, sampling.cfg != 1.0, dev), \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            codes = generate(model, layout, [conditioner.null] * len(batch) if embedder else conditions, conditioner.null,
                             seeds, sampling)
        pixels = image_tok.decode(codes.view(len(batch), *layout.grid)).cpu().numpy()
        for i, ((kind, value, _), img) in enumerate(zip(batch, pixels)):
            index = start + i
            name = f"images/{index:05d}.png"
            Image.fromarray(img).save(out / name)
            images.append(img)
            records.append({"index": index, "file": name, kind: value, "seed": seeds[i], **asdict(sampling),
                            "model": str(model_dir), "codes": codes[i].tolist()})
    save_grid(images, out / "grid.png", cols=n if n > 1 else None)  # one row per prompt or class
    (out / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def caption_prefix(model, model_dir: Path, meta: dict, encoder_path: str | None, device: torch.device):
    """A caption-features model's caption embedder (attached to `model`) and the caption encoder it records."""
    from pipeline.models.caption_encoder import load_recorded_caption_encoder
    record = meta["captions"]
    embedder = load_embedder(model_dir, record, model.config.hidden_size).to(device)
    embedder.attach(model)
    return embedder, load_recorded_caption_encoder(record["encoder"], encoder_path, device)


def feeding(embedder, features: list, guided: bool, device: torch.device):
    """The prompts' caption features for the batch's rows, then (with guidance) as many unconditional
    rows, for a caption-features model; nothing for any other."""
    if embedder is None:
        return nullcontext()
    caption, lengths = right_aligned(list(features) + [None] * len(features) * guided, embedder.tokens,
                                     embedder.mlp[0].in_features)
    return embedder.feeding(caption.to(device), lengths.to(device))
