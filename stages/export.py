"""`arra-pipe export`: a training run -> a plain Hugging Face model directory.

The DeepSpeed checkpoint (any ZeRO stage) is consolidated to fp32 with DeepSpeed's own tool,
the LM weights go to `model.safetensors` with its config and text tokenizer, and two files ride
along: `arra_vocab.json` (where the image codes are: their offset, or a model's own image token ids,
<boi>/<eoi> and any newline or size tokens; grid, the image tokenizer's name and sha256) and the
GVA projector in `arra_projector.safetensors`, outside the model so that inference loads the
unchanged base architecture: `AutoModelForCausalLM`, or for the Chameleon family
`ChameleonForConditionalGeneration` (whose own forward hides image logits; arra-pipe's sampler
reads them through pipeline/lm/chameleon.py).
A model trained with `--rope 2d` is exported as a plain Llama too; its layout says `"rope": "2d"`, and
the 2D rotary module is installed by whoever loads it (`arra-pipe sample` does; see pipeline/lm/rope2d.py).
A `--condition caption-features` model also carries its caption embedder (MLP and unconditional
embedding) in `arra_captions.safetensors`, recorded under "captions" in `arra_vocab.json` with the
caption encoder that made its features (pipeline/lm/caption_prefix.py says how the prefix is built).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.errors import ArraError
from pipeline.lm.causal_lm import LAYOUT_FILE, PROJECTOR_FILE, plain_lm
from pipeline.models.weights import deepspeed_loads_weights_only


def consolidated_state_dict(checkpoints: Path, tag: str | None) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole ARRA model from a DeepSpeed checkpoint directory."""
    tag = tag or (checkpoints / "latest").read_text().strip()
    files = sorted((checkpoints / tag).glob("*model_states.pt"))
    if not files:
        raise ArraError(f"{checkpoints / tag}: no DeepSpeed model states")
    with deepspeed_loads_weights_only():
        if _zero_stage(checkpoints / tag) == 0:  # the whole model is in one file
            state = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt")
            return {k: v.float() for k, v in state["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)


def _zero_stage(tag_dir: Path) -> int:
    config = json.loads((tag_dir.parents[1] / "deepspeed_config.json").read_text())
    return config.get("zero_optimization", {}).get("stage", 0)


def export(run: str, out: str, tag: str | None = None, dtype: str = "float32") -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig
    run, out = Path(run), Path(out)
    if not (run / "checkpoints" / "latest").exists() and tag is None:
        raise ArraError(f"{run}: no checkpoints yet")
    state = consolidated_state_dict(run / "checkpoints", tag)
    lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    projector = {k[len("projector."):]: v.contiguous() for k, v in state.items() if k.startswith("projector.")}
    captions = {k[len("captions."):]: v.contiguous() for k, v in state.items() if k.startswith("captions.")}
    config = AutoConfig.from_pretrained(run / "model")
    model = plain_lm(config)
    missing, unexpected = model.load_state_dict(lm_state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", None) or ()]
    if unexpected or missing:
        raise ArraError(f"{run}: checkpoint does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    for f in (run / "model").iterdir():
        if f.name != "config.json":
            shutil.copy2(f, out / f.name)
    train_config = json.loads((run / "train_config.json").read_text())
    layout = json.loads((run / "model" / LAYOUT_FILE).read_text())
    layout["training"] = {"teacher": train_config["teacher"], "teacher_dim": train_config["teacher_dim"],
                          "lambda": train_config["options"]["lam"], "align_layer": train_config["options"]["align_layer"],
                          "steps": train_config["steps"], "checkpoint": tag or (run / "checkpoints" / "latest").read_text().strip()}
    (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    if captions:
        save_file(captions, str(out / layout["captions"]["file"]), metadata={"encoder": layout["captions"]["encoder"]["name"]})
    if projector:
        save_file(projector, str(out / PROJECTOR_FILE), metadata={"teacher": str(train_config["teacher"]),
                                                                 "align_layer": str(train_config["options"]["align_layer"])})
    return out
