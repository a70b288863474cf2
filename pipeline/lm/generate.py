"""Autoregressive image generation: condition, the layout's image prefix (<boi>, and a model's own
tokens around it) -> N image codes, with a KV cache and classifier-free guidance. ARRA changes
nothing at inference; this is the standard loop.

Only image codes can be sampled at a code's place (the logits are restricted to the codes' token
ids, and a drawn id is mapped back to its code), a layout with a newline token gets it at the end
of each row without a draw (as Lumina-mGPT's sampler forces it), the image ends after exactly grid
h*w codes (where <eoi> goes), and each image has its own random generator, so an image depends on
its seed, not on the batch it was drawn in. The whole batch is sampled at once, with no host sync
per step (see `sample_rows`).
Positions are those training gives (`token_positions`): a row's real tokens from 0, or for a 2D-RoPE
model shifted so that every row's first code sits at one position, whatever its condition's length.
"""

from __future__ import annotations

import inspect

import torch

from pipeline.lm.rope2d import token_positions
from pipeline.lm.sampling import Sampling
from pipeline.lm.vocab import VocabLayout


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance written so that scale 1 returns `cond` exactly."""
    return cond + (scale - 1.0) * (cond - uncond)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """BxV logits whose softmax is the distribution a row is drawn from (temperature > 0):
    divided by the temperature, then top-k (tokens tied with the k-th are kept), then top-p on
    what top-k left (the smallest set of most likely tokens whose probability reaches top_p);
    filtered tokens are -inf."""
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # the mass before it already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_rows(logits: torch.Tensor, generators: list[torch.Generator], s: Sampling) -> torch.Tensor:
    """One token per row from BxV logits with temperature, top-k and top-p (`filter_logits`);
    greedy at temperature 0.

    All rows at once by an exponential race, argmax(p / E) with E ~ Exp(1): the draw that
    torch.multinomial makes for one sample (same tokens for the same generator state), without
    its validity checks, which cost two host syncs per row on CUDA. Row i's noise comes from
    `generators[i]` alone, so a row does not depend on the others."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators):
        row.exponential_(generator=g)
    return (probs / noise).argmax(-1)


def cache_keyword(model) -> str:
    """The KV-cache argument (and output field) of `model.forward`: transformers 5.24 calls it
    `cache`, 5.17 `past_key_values` and does not know `cache` (it would be ignored)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r):] = 1
    return ids.to(device), attn.to(device)


@torch.inference_mode()
def generate(model, layout: VocabLayout, conditions: list[list[int]], null: list[int], seeds: list[int],
             sampling: Sampling, kv_cache: bool = True) -> torch.Tensor:
    """Image codes (B x h*w, values in 0..codebook-1) for each condition. With cfg != 1 every
    condition is paired with the null condition in the same batch (empty for a layout whose
    unconditional row starts at <boi>, as the official Chameleon sampler's). Nothing is drawn after the
    last code: <eoi> and what follows it (the official layout's final <sep>, where its sampler stops)
    are known. `kv_cache=False` recomputes the whole prefix at every step (for checking and benchmarking)."""
    device = next(model.parameters()).device
    b, guided = len(conditions), sampling.cfg != 1.0
    rows = [c + layout.image_prefix for c in conditions + ([null] * b if guided else [])]
    ids, attn = _left_pad(rows, layout.pad, device)
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    code_ids = torch.as_tensor(layout.code_ids, device=device)
    slots = layout.image_slots.tolist()
    slots = slots[:max(i for i, is_code in enumerate(slots) if is_code) + 1]  # after the last code all is known
    codes, past, cache = [], None, cache_keyword(model)
    padded = len({len(r) for r in rows}) > 1  # without padding no mask: transformers checks one with a host sync
    before_image = torch.tensor([len(r) for r in rows], device=device)
    step_ids, step_attn = ids, attn
    for is_code in slots:
        positions = token_positions(layout, step_attn, before_image)
        if kv_cache and past is not None:
            positions = positions[:, -1:]
        out = model(input_ids=step_ids, attention_mask=step_attn if padded else None, position_ids=positions,
                    use_cache=kv_cache, logits_to_keep=1, **{cache: past})
        if is_code:
            logits = out.logits[:, -1].index_select(-1, code_ids).float()
            if guided:
                logits = guide(logits[:b], logits[b:], sampling.cfg)
            token = sample_rows(logits, generators, sampling)
            codes.append(token)
            nxt = code_ids[token].repeat(2 if guided else 1)[:, None]
        else:  # the end of a row: the layout's newline token, not drawn
            nxt = torch.full((len(rows), 1), layout.newline, dtype=torch.long, device=device)
        step_attn = torch.cat([step_attn, torch.ones_like(nxt)], dim=1)
        if kv_cache:
            past, step_ids = getattr(out, cache), nxt
        else:
            step_ids = torch.cat([step_ids, nxt], dim=1)
    return torch.stack(codes, dim=1)
