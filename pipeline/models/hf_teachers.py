"""Teachers published as transformers checkpoints (`config.json` + `model.safetensors` or
`pytorch_model.bin`): CLIP ViT-L/14 (`CLIPVisionModelWithProjection`), DINOv2 (`Dinov2Model`) and
MedSAM (`SamModel`'s vision encoder).

Loading goes through `from_pretrained` on the local folder, so transformers' own renaming of
older checkpoint keys applies; safetensors or `torch.load(weights_only=True)` read the weights,
no hub is contacted and no remote code runs. Keys the teacher does not use (the text tower of a
full CLIP checkpoint, SAM's prompt encoder and mask decoder, buffers older transformers saved)
are dropped by name; any other missing, unexpected or mis-shaped key is refused, naming it.
CLIP's text tower is opened separately (`CLIPTeacher.text_tower()`), only for CLIP-Score.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.models.registry import RegistryError, register
from pipeline.models.teachers import Teacher, TextTower, ViTTeacher, load_tokenizer, refuse_mismatch

BUFFERS_OLD_TRANSFORMERS_SAVED = r"(^|\.)position_ids$"


def load_pretrained(name: str, model_cls, folder: Path, config=None, unused: str = BUFFERS_OLD_TRANSFORMERS_SAVED):
    """`model_cls` from a local checkpoint folder, fp32, in eval mode; keys matching `unused`
    may be in the checkpoint without being used, every other difference is an error."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(folder, config=config, local_files_only=True, dtype=torch.float32,
                                                ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    refuse_mismatch(name, info["missing_keys"], [k for k in info["unexpected_keys"] if not re.search(unused, k)],
                    sorted(info["mismatched_keys"]))
    return model.eval()


def clip_tower_config(config_cls, folder: Path):
    """One tower's config from a full CLIPModel `config.json`, which keeps the projection width at the top level."""
    config = config_cls.from_pretrained(folder)
    config.projection_dim = json.loads((folder / "config.json").read_text()).get("projection_dim", config.projection_dim)
    return config


class CLIPTextTower(TextTower):
    """CLIP's text tower: `get_text_features` (the projected end-of-text token)."""

    def __init__(self, spec: dict, folder: Path):
        name = spec["name"]
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        config = clip_tower_config(CLIPTextConfig, folder)
        super().__init__(load_tokenizer(spec, folder), config.max_position_embeddings)
        unused = rf"^(vision_model\.|visual_projection\.|logit_scale$)|{BUFFERS_OLD_TRANSFORMERS_SAVED}"
        self.net = load_pretrained(name, CLIPTextModelWithProjection, folder, config, unused)

    def embed(self, input_ids, attention_mask):
        return self.net(input_ids=input_ids, attention_mask=attention_mask).text_embeds


@register("teachers", "clip")
class CLIPTeacher(ViTTeacher):
    """CLIP's vision tower: `cls` is `get_image_features` (projected CLS, not normalised);
    `avgpool` puts the mean patch token through the same final norm and projection."""

    has_text_tower = True

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        config = clip_tower_config(CLIPVisionConfig, weights)
        self.check_width(config.projection_dim)
        unused = rf"^(text_model\.|text_projection\.|logit_scale$)|{BUFFERS_OLD_TRANSFORMERS_SAVED}"
        self.net = load_pretrained(self.name, CLIPVisionModelWithProjection, weights, config, unused)

    def tokens(self, x):
        h = self.net.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        return h[:, 0], h[:, 1:]

    def head(self, pooled):
        return self.net.visual_projection(self.net.vision_model.post_layernorm(pooled))

    def text_tower(self) -> CLIPTextTower:
        return CLIPTextTower(self.spec, self.weights_path).to(self.device).eval()


@register("teachers", "dinov2")
class DINOv2Teacher(ViTTeacher):
    """DINOv2: `cls` is the final-norm CLS token (`pooler_output`), `avgpool` the mean patch token."""

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        from transformers import Dinov2Config, Dinov2Model
        config = Dinov2Config.from_pretrained(weights)
        self.check_width(config.hidden_size)
        self.net = load_pretrained(self.name, Dinov2Model, weights, config)

    def tokens(self, x):
        h = self.net(pixel_values=x).last_hidden_state
        return h[:, 0], h[:, 1:]


@register("teachers", "sam")
class SAMTeacher(Teacher):
    """SAM's image encoder (MedSAM): the 256x64x64 neck output at 1024 px, average-pooled to
    256-d as the official `pre_medsam_feature.py` does."""

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        from transformers import SamVisionConfig, SamVisionModel
        config = SamVisionConfig.from_pretrained(weights)
        self.check_width(config.output_channels)
        if self.input_size != config.image_size:
            raise RegistryError(f"{self.name}: SAM's encoder takes {config.image_size} px inputs only "
                                f"(its position embedding is fixed), not {self.input_size}")
        unused = rf"^(prompt_encoder\.|mask_decoder\.|shared_image_embedding\.)|{BUFFERS_OLD_TRANSFORMERS_SAVED}"
        self.net = load_pretrained(self.name, SamVisionModel, weights, config, unused)

    def features(self, x):
        return self.net(pixel_values=x).last_hidden_state.mean(dim=(2, 3))
