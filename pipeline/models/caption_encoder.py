"""Caption encoders: captions in, one feature per caption token out (LlamaGen's text-to-image
models condition on FLAN-T5-XL's). Like a teacher, the encoder runs once, at extraction, and its
features are stored as a column of the feature set; only `arra-pipe sample` runs it again, on the
prompts, located and checked exactly as at extraction.

A T5 checkpoint is read as published (`config.json`, `model.safetensors` or sharded
`model.safetensors.index.json`, the fast tokenizer's `tokenizer.json`): safetensors only, no remote
code, and only the encoder is kept (the decoder and LM head of a full checkpoint are dropped by
name; any other difference is refused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.models.frozen import FrozenModel
from pipeline.models.registry import RegistryError, register
from pipeline.models.teachers import refuse_mismatch

UNUSED = r"^(decoder\.|lm_head\.)"  # the decoder half of a full T5 checkpoint


class CaptionEncoder(FrozenModel):
    dim: int
    max_tokens: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features B x L x dim, float32, zero past each caption's end; token counts B), L <= max_tokens."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "loader": self.spec["loader"], "dim": self.dim, "max_tokens": self.max_tokens,
                **self.describe_weights()}

    def rows(self, captions: list[str]) -> list[np.ndarray]:
        """Each caption's features as a feature set stores them: float16, one row per token."""
        features, lengths = self.encode(captions)
        return [f[:n] for f, n in zip(features.cpu().numpy().astype(np.float16), lengths.tolist())]


@register("caption_encoders", "t5-encoder")
class T5CaptionEncoder(CaptionEncoder):
    """`T5EncoderModel`'s last hidden state of the tokens of each caption (</s> included), as
    LlamaGen's T5Embedder computes them."""

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights)
        import re
        from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
        self.dim, self.max_tokens = int(spec["dim"]), int(spec["max_tokens"])
        config = T5Config.from_pretrained(weights, local_files_only=True)
        if config.d_model != self.dim:
            raise RegistryError(f"{self.name}: the checkpoint in {weights} is {config.d_model}-d but the manifest says "
                                f"{self.dim}-d; is it the right checkpoint for this name?")
        self.pad_id = config.pad_token_id
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(weights / "tokenizer.json"))
        net, info = T5EncoderModel.from_pretrained(weights, config=config, use_safetensors=True, local_files_only=True,
                                                   dtype=torch.float32, output_loading_info=True)
        refuse_mismatch(self.name, info["missing_keys"], [k for k in info["unexpected_keys"] if not re.search(UNUSED, k)],
                        sorted(info["mismatched_keys"]))
        self.net = net.eval()

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_tokens)["input_ids"]
        lengths = torch.tensor([len(i) for i in ids])
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        input_ids = torch.full(mask.shape, self.pad_id, dtype=torch.long)
        input_ids[mask] = torch.tensor([t for row in ids for t in row], dtype=torch.long)
        with self.autocast():
            h = self.net(input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device)).last_hidden_state
        return h.float() * mask.to(h.device)[..., None], lengths


def load_recorded_caption_encoder(record: dict, override: str | None = None,
                                  device: str | torch.device = "cpu") -> CaptionEncoder:
    """The caption encoder a feature set or a model recorded (name, weights path, sha256): from
    `override`, else the recorded path, else wherever the registry finds that name; refused unless
    its sha256 and width are the recorded ones."""
    from pipeline.models.registry import build
    recorded = record.get("weights_path")
    path = override or (recorded if recorded and Path(recorded).exists() else None)
    try:
        encoder = build("caption_encoders", record["name"], path)
    except (ValueError, OSError) as exc:  # WeightsError, RegistryError
        raise RegistryError(f"the {record['name']} caption encoder is not at the recorded {recorded!r}, nor where the "
                            f"registry looks: {exc}\nPass --caption-encoder-path (weights with sha256 "
                            f"{record['weights_sha256'][:12]}...)") from exc
    if (encoder.weights_sha256, encoder.dim, encoder.max_tokens) != (record["weights_sha256"], record["dim"], record["max_tokens"]):
        raise RegistryError(f"{encoder.weights_path}: caption encoder {encoder.name} (sha256 {encoder.weights_sha256[:12]}..., "
                            f"{encoder.dim}-d, {encoder.max_tokens} tokens) is not the one recorded (sha256 "
                            f"{record['weights_sha256'][:12]}..., {record['dim']}-d, {record['max_tokens']} tokens); "
                            "pass --caption-encoder-path")
    return encoder.to(device).eval()
