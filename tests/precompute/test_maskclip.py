"""Tests of the MaskCLIP teacher (clip2scene.precompute.maskclip) and prompts, on a tiny ViT.

Nothing here touches the network: HF_HUB_OFFLINE=1 is set, and every weight lookup is pointed at
tmp_path (HOME and HF_HUB_CACHE are monkeypatched).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from clip2scene.precompute import maskclip as mc
from clip2scene.precompute.maskclip import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_MODEL_NAME,
    MaskCLIP,
    TeacherConfig,
    WeightsNotFoundError,
    encode_text,
    load_teacher,
    register_tiny_model,
    resize_positional_embedding,
)
from clip2scene.precompute.prompts import TEMPLATES, prompt_name, templates_sha256

CLASSES = ("car", "traffic_cone", "vegetation")
FEW_TEMPLATES = TEMPLATES[:3] + TEMPLATES[-2:]
TINY_CFG = TeacherConfig(model=TINY_MODEL_NAME, weights="none", image_size=(64, 96), seed=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network, and no real user caches: every lookup lands in tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def teacher() -> MaskCLIP:
    return load_teacher(TINY_CFG, CLASSES, templates=FEW_TEMPLATES)


def _tiny_clip(seed: int, quick_gelu: bool = False) -> torch.nn.Module:
    register_tiny_model()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_MODEL_NAME, pretrained=None, force_quick_gelu=quick_gelu).eval()


def _images(b: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _reference_dense(visual, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP by hand from the model's own weight matrices."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    b, _, hh, ww = x.shape
    p = visual.patch_size[0]
    h, w = hh // p, ww // p
    with torch.no_grad():
        if (h, w) == tuple(visual.grid_size):
            x = visual._embeds(x)  # the model's own embedding path
        else:
            x = visual.conv1(x).flatten(2).transpose(1, 2)
            x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(b, -1, -1), x], dim=1)
            pe = visual.positional_embedding
            gh, gw = visual.grid_size
            grid = pe[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pe = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
            x = visual.ln_pre(x + pe)
        blocks = visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        width = x.shape[-1]
        y = F.layer_norm(x, (width,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
        w_v = last.attn.in_proj_weight[2 * width:]
        b_v = last.attn.in_proj_bias[2 * width:]
        v = y @ w_v.T + b_v
        x = x + (v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias)
        z = F.layer_norm(x, (width,), last.ln_2.weight, last.ln_2.bias, last.ln_2.eps)
        z = last.mlp.c_fc(z)
        z = z * torch.sigmoid(1.702 * z) if isinstance(last.mlp.gelu, QuickGELU) else F.gelu(z)
        x = x + last.mlp.c_proj(z)
        x = F.layer_norm(x[:, 1:], (width,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        x = x @ visual.proj
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return F.normalize(x, dim=1)


# ------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------


def test_templates_85_unique_with_placeholder():
    assert len(TEMPLATES) == 85
    assert len(set(TEMPLATES)) == 85
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert TEMPLATES[0] == "a bad photo of a {}."
    assert TEMPLATES[79] == "a tattoo of the {}."
    assert TEMPLATES[80:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )


def test_templates_equal_open_clip_imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert TEMPLATES[:80] == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def test_templates_sha256_and_prompt_name():
    assert templates_sha256(TEMPLATES) == hashlib.sha256("\n".join(TEMPLATES).encode("utf-8")).hexdigest()
    assert templates_sha256(TEMPLATES[:2]) != templates_sha256(TEMPLATES[1::-1])
    assert prompt_name("traffic_cone") == "traffic_cone"
    assert prompt_name("driveable surface") == "driveable surface"


# ------------------------------------------------------------------------------------------
# positional embedding
# ------------------------------------------------------------------------------------------


def test_resize_positional_embedding_same_grid_unchanged():
    pe = torch.randn(1 + 4 * 4, 8)
    assert torch.equal(resize_positional_embedding(pe, (4, 4), (4, 4)), pe)


def test_resize_positional_embedding_keeps_class_row_and_is_bicubic():
    pe = torch.randn(1 + 14 * 14, 8)
    out = resize_positional_embedding(pe, (14, 14), (14, 26))
    assert out.shape == (1 + 14 * 26, 8)
    assert torch.equal(out[0], pe[0])
    grid = pe[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(14, 26), mode="bicubic", align_corners=False)
    assert torch.allclose(out[1:], ref.permute(0, 2, 3, 1).reshape(-1, 8))
    const = torch.ones(1 + 16, 3) * 0.5
    assert torch.allclose(resize_positional_embedding(const, (4, 4), (7, 3)), torch.full((22, 3), 0.5))
    with pytest.raises(ValueError):
        resize_positional_embedding(pe, (4, 4), (4, 4))


# ------------------------------------------------------------------------------------------
# dense path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 96), (64, 64), (96, 48)])
def test_dense_features_match_hand_reference(teacher, size):
    images = _images(2, *size)
    ref = _reference_dense(teacher.visual, images)
    out = teacher.dense_features(images)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_dense_reference_with_layer_scale_and_quick_gelu():
    """ls_1/ls_2 LayerScale modules and QuickGELU are honoured in the value-only block."""
    clip = _tiny_clip(5, quick_gelu=True)
    for blk in clip.visual.transformer.resblocks:
        blk.ls_1 = open_clip.transformer.LayerScale(64, 0.5)
        blk.ls_2 = open_clip.transformer.LayerScale(64, 2.0)
    t = MaskCLIP.from_clip(clip, open_clip.get_tokenizer(TINY_MODEL_NAME), CLASSES[:1],
                           templates=TEMPLATES[:1], image_size=(64, 96))
    images = _images(1)
    out = t.dense_features(images)
    # by hand, with layer scale folded in
    v = t.visual
    last = v.transformer.resblocks[-1]
    x = _embeds_resized(v, images)
    with torch.no_grad():
        x = v.transformer.resblocks[0](x)
        y = last.ln_1(x)
        val = F.linear(y, last.attn.in_proj_weight[128:], last.attn.in_proj_bias[128:])
        x = x + 0.5 * last.attn.out_proj(val)
        x = x + 2.0 * last.mlp(last.ln_2(x))
        ref = F.normalize((v.ln_post(x[:, 1:]) @ v.proj).transpose(1, 2).reshape(1, -1, 4, 6), dim=1)
    assert isinstance(last.mlp.gelu, QuickGELU)
    assert torch.allclose(out, ref, atol=1e-5)


def _embeds_resized(v, images):
    x = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
        pe = resize_positional_embedding(v.positional_embedding, v.grid_size, (4, 6))
        return v.ln_pre(x + pe)


def test_dense_features_shape_dtype_norm_determinism(teacher):
    images = _images(3, 64, 96)
    a = teacher.dense_features(images)
    b = teacher.dense_features(images)
    assert a.shape == (3, teacher.embed_dim, 4, 6) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(3, 4, 6), atol=1e-5)
    assert torch.equal(a, b)
    assert not a.requires_grad and not a.is_inference()
    # a size that is not a multiple of the patch: trailing pixels are dropped (floor)
    c = teacher.dense_features(_images(1, 70, 100))
    assert c.shape == (1, teacher.embed_dim, 4, 6)
    # batch independence
    assert torch.allclose(teacher.dense_features(images[1:2]), a[1:2], atol=1e-5)


def test_normalize_and_input_checks(teacher):
    images = _images(1, 64, 96)
    n = teacher.normalize(images)
    assert torch.allclose(n[:, 0], (images[:, 0] - CLIP_MEAN[0]) / CLIP_STD[0])
    assert torch.allclose(n[:, 2], (images[:, 2] - CLIP_MEAN[2]) / CLIP_STD[2])
    with pytest.raises(TypeError):
        teacher.dense_features((images * 255).to(torch.uint8))
    with pytest.raises(ValueError):
        teacher.dense_features(images[:, :2])


def test_teacher_is_frozen_and_stays_eval(teacher):
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_seeded_random_init_reproducible(teacher, caplog):
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING):
        same = load_teacher(TINY_CFG, CLASSES, templates=FEW_TEMPLATES)
    assert any("meaningless" in r.getMessage() for r in caplog.records)
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG must not be disturbed"
    other = load_teacher(TeacherConfig(TINY_MODEL_NAME, "none", (64, 96), seed=1), CLASSES, templates=FEW_TEMPLATES)
    images = _images(1)
    assert torch.equal(same.dense_features(images), teacher.dense_features(images))
    assert torch.equal(same.text_embeddings, teacher.text_embeddings)
    assert not torch.allclose(other.dense_features(images), teacher.dense_features(images))
    assert same.fingerprint == teacher.fingerprint
    assert teacher.fingerprint["weights_sha256"] == "random"


def test_fingerprint_fields(teacher):
    fp = teacher.fingerprint
    assert fp["model"] == TINY_MODEL_NAME and fp["weights"] == "none"
    assert fp["image_size"] == [64, 96] and fp["class_names"] == list(CLASSES)
    assert fp["templates_sha256"] == templates_sha256(FEW_TEMPLATES)
    assert fp["embed_dim"] == 64 and fp["patch_size"] == 16
    json.dumps(fp)  # JSON-able


# ------------------------------------------------------------------------------------------
# text side and logits
# ------------------------------------------------------------------------------------------


def test_text_embeddings_match_by_hand_loop():
    clip = _tiny_clip(2)
    tok = open_clip.get_tokenizer(TINY_MODEL_NAME)
    names = ["car", "traffic_cone"]
    emb = encode_text(clip, tok, names, FEW_TEMPLATES, "cpu")
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-6)
    rows = []
    with torch.no_grad():
        for name in names:
            per_t = [F.normalize(clip.encode_text(tok([t.format(name)]))[0], dim=0) for t in FEW_TEMPLATES]
            rows.append(F.normalize(torch.stack(per_t).mean(0), dim=0))
    assert torch.allclose(emb, torch.stack(rows), atol=1e-5)
    assert not emb.is_inference()


def test_trimmed_text_encoding_equals_encode_text():
    clip = _tiny_clip(3)
    tok = open_clip.get_tokenizer(TINY_MODEL_NAME)
    tokens = tok(["a car.", "a photo of the hard to see driveable surface in a video game, at night."])
    with torch.no_grad():
        assert torch.allclose(mc._encode_tokens(clip, tokens), clip.encode_text(tokens), atol=1e-5)


def test_logits_are_cosines(teacher):
    feats = teacher.dense_features(_images(2)).movedim(1, -1)  # (2, 4, 6, D)
    logits = teacher.logits(feats)
    assert logits.shape == (2, 4, 6, len(CLASSES)) and logits.dtype == torch.float32
    assert logits.min() >= -1 - 1e-5 and logits.max() <= 1 + 1e-5
    cos = F.cosine_similarity(feats[..., None, :], teacher.text_embeddings, dim=-1)
    assert torch.allclose(logits, cos, atol=1e-5)
    assert torch.equal(logits.argmax(-1), cos.argmax(-1))
    assert torch.equal(teacher.logits(teacher.text_embeddings).argmax(-1), torch.arange(len(CLASSES)))
    # differentiable in the features (used to classify student features)
    f = F.normalize(torch.randn(5, teacher.embed_dim, requires_grad=True), dim=-1)
    teacher.logits(f).sum().backward()


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------


def _assert_same_teacher(loaded: MaskCLIP, source_clip, images):
    ref = MaskCLIP.from_clip(source_clip, open_clip.get_tokenizer(TINY_MODEL_NAME), CLASSES,
                             templates=FEW_TEMPLATES, image_size=(64, 96))
    assert torch.equal(loaded.dense_features(images), ref.dense_features(images))
    assert torch.allclose(loaded.text_embeddings, ref.text_embeddings, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_loads_identically(tmp_path, suffix):
    source = _tiny_clip(7)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    t = load_teacher(TeacherConfig(TINY_MODEL_NAME, str(path), (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    _assert_same_teacher(t, source, _images(2))
    assert t.fingerprint["weights"] == str(path)
    assert t.fingerprint["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert t.fingerprint["quick_gelu"] is False


def test_openai_jit_archive_loads_with_quick_gelu(tmp_path):
    source = _tiny_clip(8, quick_gelu=True)
    path = tmp_path / "tiny_jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(source), str(path))
    t = load_teacher(TeacherConfig(TINY_MODEL_NAME, str(path), (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert isinstance(t.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert t.fingerprint["quick_gelu"] is True
    _assert_same_teacher(t, source, _images(2))


def _fake_tag(monkeypatch, cfg: dict) -> None:
    register_tiny_model()
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_MODEL_NAME, {"faketag": cfg})


def test_tag_resolves_from_hf_cache_offline(monkeypatch, tmp_path):
    _fake_tag(monkeypatch, {"hf_hub": "fakeorg/tiny-clip/", "quick_gelu": True})
    source = _tiny_clip(9, quick_gelu=True)
    repo = tmp_path / "hf_cache" / "models--fakeorg--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    snap = repo / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    torch.save(source.state_dict(), snap / "open_clip_pytorch_model.bin")
    t = load_teacher(TeacherConfig(TINY_MODEL_NAME, "faketag", (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert isinstance(t.visual.transformer.resblocks[-1].mlp.gelu, QuickGELU)
    assert t.fingerprint["weights"] == "faketag"
    assert t.fingerprint["weights_sha256"] == hashlib.sha256(
        (snap / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    _assert_same_teacher(t, source, _images(1))


def test_tag_resolves_from_clip_url_cache_and_checks_sha(monkeypatch, tmp_path):
    source = _tiny_clip(10, quick_gelu=True)
    clip_dir = tmp_path / "home" / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    path = clip_dir / "tiny.pt"
    torch.save(source.state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    _fake_tag(monkeypatch, {"url": f"https://openaipublic.azureedge.net/clip/models/{sha}/tiny.pt", "quick_gelu": True})
    t = load_teacher(TeacherConfig(TINY_MODEL_NAME, "faketag", (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert t.fingerprint["weights_sha256"] == sha
    _assert_same_teacher(t, source, _images(1))
    _fake_tag(monkeypatch, {"url": f"https://openaipublic.azureedge.net/clip/models/{'0' * 64}/tiny.pt"})
    with pytest.raises(WeightsNotFoundError, match="sha256"):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, "faketag", (64, 96)), CLASSES, templates=FEW_TEMPLATES)


def test_bare_file_activation_inference(monkeypatch, tmp_path, caplog):
    """A bare state-dict file gets the activation of the architecture's OpenAI weights, unless an
    open_clip_config.json beside it says otherwise."""
    register_tiny_model()
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_MODEL_NAME,
                        {"openai": {"hf_hub": "fakeorg/tiny-openai/", "quick_gelu": True}})
    source = _tiny_clip(12, quick_gelu=True)
    path = tmp_path / "bare" / "open_clip_pytorch_model.bin"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        t = load_teacher(TeacherConfig(TINY_MODEL_NAME, str(path), (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert t.fingerprint["quick_gelu"] is True
    assert any("assuming OpenAI-trained" in r.getMessage() for r in caplog.records)
    _assert_same_teacher(t, source, _images(1))
    (path.parent / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**mc._TINY_MODEL_CONFIG, "quick_gelu": False}}))
    t2 = load_teacher(TeacherConfig(TINY_MODEL_NAME, str(path), (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert t2.fingerprint["quick_gelu"] is False
    assert not isinstance(t2.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_openai_tag_missing_raises_with_paths(tmp_path, monkeypatch):
    # guard: the resolution must not build ViT-B-16 or go near the network before failing
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("model built before weights found"))
    with pytest.raises(WeightsNotFoundError) as exc:
        load_teacher(TeacherConfig(), ["car"])
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt") in msg
    assert str(tmp_path / "hf_cache" / "models--timm--vit_base_patch16_clip_224.openai") in msg
    assert "open_clip_pytorch_model.bin" in msg and "--clip-weights" in msg


def test_bad_path_raises_with_path(tmp_path):
    bad = tmp_path / "nowhere" / "weights.bin"
    with pytest.raises(WeightsNotFoundError, match=str(bad).replace(".", r"\.")):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, str(bad), (64, 96)), CLASSES)


def test_local_dir(tmp_path):
    source = _tiny_clip(11)
    folder = tmp_path / "tiny_dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": mc._TINY_MODEL_CONFIG, "preprocess_cfg": {}}))
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    t = load_teacher(TeacherConfig(TINY_MODEL_NAME, f"local-dir:{folder}", (64, 96)), CLASSES, templates=FEW_TEMPLATES)
    assert t.fingerprint["weights_sha256"] == hashlib.sha256(
        (folder / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    _assert_same_teacher(t, source, _images(1))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, f"local-dir:{empty}", (64, 96)), CLASSES)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_teacher(TeacherConfig("ViT-B-17", "none"), CLASSES)
    with pytest.raises(ValueError, match="multiples of the patch"):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, "none", (60, 96)), CLASSES, templates=FEW_TEMPLATES)
    with pytest.raises(NotImplementedError):
        load_teacher(TeacherConfig("RN50", "none"), CLASSES)
    with pytest.raises(ValueError):
        load_teacher(TINY_CFG, [])
