"""Chameleon-family LMs (Meta's Chameleon, Anole, Lumina-mGPT) as ARRA trains and samples them.

transformers maps a Chameleon config only to `ChameleonForConditionalGeneration` (AutoModelForCausalLM
refuses it), and that class's forward sets every image token's logit to the dtype's minimum
(transformers does not generate Chameleon images). `ChameleonImageLM` is the same class, with the
same weights and names, whose logits are the head's on the decoder's last hidden state, image
tokens included. A checkpoint therefore loads into it as it is, and `export` saves the plain class,
which `ChameleonForConditionalGeneration.from_pretrained` loads without arra-pipe or remote code.
"""

from __future__ import annotations

import inspect

import torch
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast


class ChameleonImageLM(ChameleonForConditionalGeneration):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs):
        """A causal LM's forward without the image-logit mask. The rest (the KV cache, use_cache,
        output_hidden_states) goes to the decoder as given, and comes back in the output."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, **{k: v for k, v in out.items() if k != "last_hidden_state"})

    # the parent's signature, so that `generate.cache_keyword` finds this transformers version's KV-cache keyword
    forward.__signature__ = inspect.signature(ChameleonForConditionalGeneration.forward)


def load_chameleon(path: str, dtype: torch.dtype) -> ChameleonImageLM:
    """A Chameleon-family checkpoint directory (any `architectures`: Lumina-mGPT names its own class
    there; none of its code is run). The VQ image encoder the class carries (`model.vqmodel`) is
    frozen: ARRA's inputs are codes already, so it would get no gradient anyway."""
    model = ChameleonImageLM.from_pretrained(path, dtype=dtype)
    model.model.vqmodel.requires_grad_(False)
    return model
