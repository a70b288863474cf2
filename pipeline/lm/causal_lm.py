"""The language models ARRA trains: plain transformers causal LMs (`LlamaForCausalLM`-style), or
Chameleon-family LMs through `ChameleonImageLM` (pipeline/lm/chameleon.py).

- ARRA-Base: a LlamaGen-sized Llama from random init (`preset`), vocabulary = condition tokens +
  image codes + <boi>/<eoi>.
- ARRA: any text-only causal LM directory (`hf:PATH`); its vocabulary is extended with the image
  codes and <boi>/<eoi>, new rows initialised to the mean of the old ones. A Chameleon-family one
  keeps its own image rows instead (see pipeline/lm/image_vocab.py).
- ARRA-Adapt: a text-to-image checkpoint (`--init PATH`), continued: an export of ours, a
  Chameleon-architecture one (Lumina-mGPT), or any whose image tokens a layout file declares.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipeline.errors import ArraError

# LlamaGen's GPT sizes (layers, width, heads); `tiny` is for tests, `mini` and `small` for quick experiments.
PRESETS = {
    "tiny": (2, 64, 4),
    "mini": (4, 128, 4),
    "small": (4, 512, 8),
    "llamagen-b": (12, 768, 12),
    "llamagen-l": (24, 1024, 16),
    "llamagen-xl": (36, 1280, 20),
    "llamagen-xxl": (48, 1536, 24),
    "llamagen-3b": (24, 3200, 32),
}
LAYOUT_FILE = "arra_vocab.json"
PROJECTOR_FILE = "arra_projector.safetensors"


def swiglu_hidden(dim: int, multiple: int = 256) -> int:
    """LlamaGen's FFN width: 2/3 of 4*dim, rounded up to a multiple of 256."""
    hidden = int(2 * 4 * dim / 3)
    return multiple * ((hidden + multiple - 1) // multiple)


def preset_config(preset: str, vocab_size: int, max_positions: int, dropout: float = 0.0):
    from transformers import LlamaConfig
    if preset not in PRESETS:
        raise ArraError(f"unknown --model preset {preset!r}; choose one of {', '.join(PRESETS)} or hf:PATH")
    layers, dim, heads = PRESETS[preset]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=swiglu_hidden(dim),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-5, attention_dropout=dropout,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_from_preset(preset: str, vocab_size: int, max_positions: int, dropout: float = 0.0, zero_head: bool = False):
    """A randomly initialised preset LM. Built through `from_config` (the same weights as the
    constructor) so that under ZeRO-3 transformers builds it already partitioned. `zero_head`:
    the output head starts at zero, as LlamaGen's does."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_config(preset_config(preset, vocab_size, max_positions, dropout))
    if zero_head:
        head = lm.get_output_embeddings()
        with torch.no_grad(), gathered(list(head.parameters())):
            head.weight.zero_()
    return lm


def is_chameleon(path: str | Path) -> bool:
    """Whether the checkpoint at `path` has the Chameleon architecture (config.json model_type
    "chameleon": Meta's Chameleon, Anole, Lumina-mGPT). `architectures` is not read: Lumina-mGPT
    names its own remote-code class there."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "chameleon"


def load_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a local directory, to train or sample (never remote code); a Chameleon-family
    one as `ChameleonImageLM`, whose logits include its image tokens."""
    if is_chameleon(path):
        from pipeline.lm.chameleon import load_chameleon
        return load_chameleon(str(path), dtype)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, dtype=dtype)


def plain_lm(config):
    """An fp32 model of `config` in the class an export is saved as, the one plain transformers loads
    it with: ChameleonForConditionalGeneration for the Chameleon family, else the causal-LM class."""
    if config.model_type == "chameleon":
        from transformers import ChameleonForConditionalGeneration
        return ChameleonForConditionalGeneration(config).float()
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_text_lm(path: str):
    """The LM of `--model hf:PATH` and its tokenizer from a local directory (never remote code)."""
    from transformers import AutoTokenizer
    if not Path(path).is_dir():
        raise ArraError(f"--model hf:{path}: not a local model directory")
    return load_lm(path), AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def zero_head_rows(model, ids) -> None:
    """Set the output head's rows of `ids` to zero: the official code's starting point from Chameleon
    (inherited from Lumina-mGPT) zeroes its image tokens' rows, so every code starts at one logit."""
    head = model.get_output_embeddings()
    with torch.no_grad(), gathered(list(head.parameters())):
        head.weight[torch.as_tensor(ids, dtype=torch.long)] = 0


def extend_vocab(model, new_size: int) -> None:
    """Grow input (and untied output) embeddings to `new_size`; new rows = mean of the old rows.
    Sizes come from the module attributes and the rows are gathered for the fill, because under
    ZeRO-3 a weight's local shape is that of its shard (empty)."""
    old = model.get_input_embeddings().num_embeddings
    if new_size <= old:
        return
    model.resize_token_embeddings(new_size, mean_resizing=False)
    embeddings = {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}
    with torch.no_grad(), gathered([p for e in embeddings.values() for p in e.parameters()]):
        for emb in embeddings.values():
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
            if getattr(emb, "bias", None) is not None:
                emb.bias[old:] = emb.bias[:old].mean()


def add_residual_dropout(lm: torch.nn.Module, p: float) -> None:
    """Dropout on each decoder layer's attention and MLP outputs before they join the residual stream
    (LlamaGen's and Lumina-mGPT's residual dropout; transformers' Llama has none). Forward hooks, so
    any decoder with `self_attn` and `mlp` blocks takes it and the exported model stays plain."""
    if p == 0:
        return
    layers = [m for m in lm.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        raise ArraError(f"--residual-dropout: {type(lm).__name__} has no decoder layers with self_attn and mlp blocks")
    for layer in layers:
        layer.self_attn.register_forward_hook(_drop_output(p))
        layer.mlp.register_forward_hook(_drop_output(p))


def add_token_dropout(lm: torch.nn.Module, p: float) -> None:
    """Dropout on the input token embeddings (LlamaGen's token dropout), as a hook like the above."""
    if p:
        lm.get_input_embeddings().register_forward_hook(_drop_output(p))


def _drop_output(p: float):
    """A forward hook that applies dropout to a module's output (the first item of a tuple, as attention
    returns (output, weights)) while the module trains."""
    def drop(module, _args, out):
        if isinstance(out, tuple):
            return (torch.nn.functional.dropout(out[0], p, module.training), *out[1:])
        return torch.nn.functional.dropout(out, p, module.training)
    return drop


def gathered(params: list[torch.nn.Parameter]):
    """Whole parameters for rank 0 to modify (broadcast on exit) when ZeRO-3 has partitioned them,
    else nothing to do."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

