"""Tokenizer and teacher behaviour through the registry, with real and tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import center_crop
from pipeline.models.registry import RegistryError, build, load_spec
from pipeline.models.image_tokenizers import save_kmeans_codebook


def test_kmeans_encode_decode_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.random((32, 2 * 2 * 3), dtype=np.float32)
    path = tmp_path / "cb.safetensors"
    save_kmeans_codebook(path, book, patch=2, resolution=8)
    tok = build("tokenizers", "kmeans", str(path))
    assert (tok.resolution, tok.grid, tok.codebook_size) == (8, (4, 4), 32)
    codes = torch.from_numpy(rng.integers(0, 32, (3, 4, 4)))
    images = tok.decode(codes)
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8
    # decoding then encoding a grid of codebook patches gives the same codes back
    assert torch.equal(tok.encode(images), codes)
    assert torch.equal(tok.encode(images), tok.encode(images.clone()))


def test_kmeans_refuses_other_files(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(RegistryError, match="not a kmeans codebook"):
        build("tokenizers", "kmeans", str(path))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RegistryError, match="known: .*efficientnet-lite0"):
        load_spec("teachers", "clip-xxl")
    with pytest.raises(RegistryError, match="known: .*kmeans"):
        load_spec("tokenizers", "magvit")


def test_teacher_checkpoint_with_wrong_keys_is_named(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet
    state = EfficientNet.from_name("efficientnet-lite0").state_dict()
    state.pop("_conv_stem.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RegistryError, match=r"missing keys \['_conv_stem.weight'\].*unexpected keys \['extra.weight'\]"):
        build("teachers", "efficientnet-lite0", str(path))


def test_efficientnet_lite0_real_weights_recognise_a_cat():
    skimage = pytest.importorskip("skimage.data")
    teacher = build("teachers", "efficientnet-lite0")
    img = center_crop(Image.fromarray(skimage.chelsea()), 224)
    batch = torch.from_numpy(np.array(img))[None]
    top = teacher.classify(batch).softmax(-1)[0].topk(3)
    assert set(top.indices.tolist()) & {281, 282, 285}, top  # tabby, tiger cat, Egyptian cat
    feats = teacher(batch)
    assert feats.shape == (1, 1280) and feats.dtype == torch.float32
    assert torch.equal(feats, teacher(batch))  # deterministic
