"""Tests of the MaskCLIP teacher (clip2scene.precompute.teacher.maskclip) and prompts, on a tiny ViT.

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

from clip2scene.precompute.teacher import text as teacher_text
from clip2scene.precompute.teacher import weights as teacher_weights
from clip2scene.precompute.teacher.maskclip import CLIP_MEAN, CLIP_STD, MaskCLIP, load_teacher, resize_positional_embedding
from clip2scene.precompute.teacher.refine import DENOISED_SCORE, REFINE_LOGIT_SCALE, refine_scores
from clip2scene.precompute.teacher.weights import TINY_MODEL_NAME, WeightsNotFoundError, register_tiny_model
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.teacher.text import encode_text
from clip2scene.precompute.teacher.prompts import TEMPLATES, prompt_name, templates_sha256

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
    x, (h, w) = _reference_last_block_input(visual, images)
    b = x.shape[0]
    with torch.no_grad():
        last = visual.transformer.resblocks[-1]
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


def _reference_last_block_input(visual, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """By hand: tokens entering the last block, (B, 1 + h*w, width) batch-first, and (h, w)."""
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
    return x, (h, w)


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
    # the seeded weights are bitwise the same (one RNG stream), so features computed here, in one
    # process with one thread count, are too
    assert torch.equal(same.dense_features(images), teacher.dense_features(images))
    # the text embeddings were computed at load time: the module fixture's load ran under another
    # torch thread count than this test (conftest sets 1 per test), so its float32 sums were
    # reduced in another order. Unit vectors of 64 float32 entries through a 2-layer text tower:
    # reordering moves each entry by a few ulps of ~0.3 (ulp 3e-8); 1e-6 is ~30 ulps.
    assert torch.allclose(same.text_embeddings, teacher.text_embeddings, rtol=0, atol=1e-6)
    again = load_teacher(TINY_CFG, CLASSES, templates=FEW_TEMPLATES)  # same process, same threads
    assert torch.equal(again.text_embeddings, same.text_embeddings)
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
        assert torch.allclose(teacher_text._encode_tokens(clip, tokens), clip.encode_text(tokens), atol=1e-5)


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
        json.dumps({"model_cfg": {**teacher_weights._TINY_MODEL_CONFIG, "quick_gelu": False}}))
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
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": teacher_weights._TINY_MODEL_CONFIG, "preprocess_cfg": {}}))
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


# ------------------------------------------------------------------------------------------
# dense_outputs and the MaskCLIP refinements (key smoothing, prompt denoising)
# ------------------------------------------------------------------------------------------

FOUR_CLASSES = ("car", "traffic_cone", "vegetation", "road")


def _refined_teacher(seed: int = 0, classes=FOUR_CLASSES, **refine) -> MaskCLIP:
    return MaskCLIP.from_clip(_tiny_clip(seed), open_clip.get_tokenizer(TINY_MODEL_NAME), classes,
                              templates=TEMPLATES[:2], image_size=(64, 96), **refine)


def _cosines(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) x (C, D) -> (B, C, h, w) cosine similarities, by F.cosine_similarity."""
    return F.cosine_similarity(feats[:, None], text[None, :, :, None, None], dim=2)


def _hand_key_smoothing(visual, images, text, smoothing_threshold: float = 1.0) -> torch.Tensor:
    """Key smoothing by hand from the model's weight matrices (float64, no shift tricks).

    keys = key slice of the last block's in_proj applied to ln_1 of its input (patch tokens),
    A = relu(cos(k_i, k_j)), W = A / row sums, P = softmax(100 s), P' = W P,
    s' = (log P' + logsumexp(100 s)) / 100 where max_c P < threshold, else s.
    """
    feats = _reference_dense(visual, images)
    s = _cosines(feats, text).double()  # (B, C, h, w)
    b, c, h, w = s.shape
    s = s.reshape(b, c, h * w)
    x, _ = _reference_last_block_input(visual, images)
    last = visual.transformer.resblocks[-1]
    width = x.shape[-1]
    with torch.no_grad():
        y = F.layer_norm(x[:, 1:], (width,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
        keys = y @ last.attn.in_proj_weight[width:2 * width].T + last.attn.in_proj_bias[width:2 * width]
    out = torch.empty_like(s)
    for i in range(b):
        k = keys[i].double()
        k = k / k.norm(dim=1, keepdim=True)
        a = (k @ k.T).clamp_min(0)
        wgt = a / a.sum(dim=1, keepdim=True)
        z = 100.0 * s[i]  # (C, N)
        prob = torch.softmax(z, dim=0)
        smoothed = (torch.log(prob @ wgt.T) + torch.logsumexp(z, dim=0)) / 100.0
        here = prob.max(dim=0).values < smoothing_threshold
        out[i] = torch.where(here[None], smoothed, s[i])
    return out.reshape(b, c, h, w).float()


def test_refinement_defaults_off_and_constants():
    cfg = TeacherConfig()
    assert cfg.key_smoothing is False and cfg.prompt_denoising is False
    assert cfg.denoise_threshold == 0.5 and cfg.smoothing_threshold == 1.0
    assert REFINE_LOGIT_SCALE == 100.0
    assert DENOISED_SCORE < -1.5 and float(torch.tensor(DENOISED_SCORE, dtype=torch.float16)) == DENOISED_SCORE


def test_dense_outputs_without_refinements_are_cosines(teacher):
    images = _images(2)
    feats, logits = teacher.dense_outputs(images)
    assert torch.equal(feats, teacher.dense_features(images))
    assert logits.shape == (2, len(CLASSES), 4, 6) and logits.dtype == torch.float32
    assert torch.allclose(logits, _cosines(feats, teacher.text_embeddings), atol=1e-6)
    assert torch.equal(logits, teacher.logits(feats.movedim(1, -1)).movedim(-1, 1))
    assert not logits.requires_grad and not logits.is_inference()


def test_key_smoothing_matches_hand_reference():
    t = _refined_teacher(key_smoothing=True)
    images = _images(2)
    feats, logits = t.dense_outputs(images)
    assert torch.equal(feats, t.dense_features(images))  # features never change
    ref = _hand_key_smoothing(t.visual, images, t.text_embeddings)
    assert torch.allclose(logits, ref, atol=1e-5), (logits - ref).abs().max()
    plain = _cosines(feats, t.text_embeddings)
    assert (logits - plain).abs().max() > 1e-3, "smoothing must change the scores of this image"
    # softmax(100 * smoothed) is the affinity-weighted average of the patch probabilities: rows sum to 1
    p = torch.softmax(REFINE_LOGIT_SCALE * logits.double(), dim=1)
    assert torch.allclose(p.sum(1), torch.ones_like(p.sum(1)))
    assert logits.min() > -1.1 and logits.max() < 1.1


def test_key_smoothing_threshold_selects_patches():
    images = _images(1)
    none = _refined_teacher(key_smoothing=True, smoothing_threshold=1e-9)  # no patch is that unsure
    feats, logits = none.dense_outputs(images)
    assert torch.allclose(logits, _cosines(feats, none.text_embeddings), atol=1e-6)
    # a threshold between the patches' confidences: only the less confident patches change
    conf = torch.softmax(REFINE_LOGIT_SCALE * _cosines(feats, none.text_embeddings), dim=1).amax(1)  # (1, 4, 6)
    # the threshold sits in the middle of the widest gap between neighbouring confidences in the
    # middle half of the patches, never on a patch's own value: the teacher computes its
    # confidences in float32 by another route (cosines ~1e-6 apart, x100 inside the softmax:
    # relative ~1e-4), so a patch right at the threshold could fall either side
    ranked = conf.flatten().sort().values
    n = len(ranked)
    lo = n // 4 + int((ranked[n // 4 + 1 : 3 * n // 4 + 1] - ranked[n // 4 : 3 * n // 4]).argmax())
    thr = float(ranked[lo] + ranked[lo + 1]) / 2
    assert float(ranked[lo + 1] - ranked[lo]) / 2 > 1e-3, "no patch may lie within float error of the threshold"
    mid = _refined_teacher(key_smoothing=True, smoothing_threshold=thr)  # same seed: same model
    _, logits_mid = mid.dense_outputs(images)
    ref = _hand_key_smoothing(mid.visual, images, mid.text_embeddings, smoothing_threshold=thr)
    assert torch.allclose(logits_mid, ref, atol=1e-5)
    unchanged = conf >= thr
    assert unchanged.any() and (~unchanged).any()
    plain = _cosines(feats, mid.text_embeddings)
    assert torch.allclose(logits_mid.movedim(1, -1)[unchanged], plain.movedim(1, -1)[unchanged], atol=1e-6)


def test_refine_scores_key_smoothing_limits():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 5, 7, generator=g) * 0.1  # (B, C, N)
    # orthogonal keys: every patch only sees itself -> scores unchanged
    eye = torch.eye(7).expand(2, 7, 7)
    out = refine_scores(scores, eye, key_smoothing=True, smoothing_threshold=2.0)
    assert torch.allclose(out, scores, atol=1e-6)
    # identical keys: every patch gets the image's mean probability
    same = torch.ones(2, 7, 3)
    out = refine_scores(scores, same, key_smoothing=True, smoothing_threshold=2.0)
    mean_p = torch.softmax(100 * scores.double(), dim=1).mean(dim=2, keepdim=True).expand(-1, -1, 7)
    assert torch.allclose(torch.softmax(100 * out.double(), dim=1), mean_p, atol=1e-6)
    # anti-parallel keys get weight 0 (clamped), not a negative weight
    k = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    two = torch.tensor([[[0.3, 0.0], [0.0, 0.3]]])
    assert torch.allclose(refine_scores(two, k, key_smoothing=True, smoothing_threshold=2.0), two, atol=1e-6)
    with pytest.raises(ValueError, match="keys"):
        refine_scores(scores, None, key_smoothing=True)
    with pytest.raises(ValueError):
        refine_scores(scores, same, key_smoothing=True, smoothing_threshold=0.0)
    with pytest.raises(ValueError):
        refine_scores(scores, prompt_denoising=True, denoise_threshold=1.5)


def test_refine_scores_denoising_crafted():
    # C = 3 classes, N = 4 patches; probabilities are softmax(100 * scores) over classes
    scores = torch.tensor([[[0.30, 0.20, 0.26, 0.25],    # class 0: p = 0.993 at patch 0
                            [0.20, 0.31, 0.26, 0.25],    # class 1: p = 0.9955 at patch 1
                            [0.25, 0.25, 0.255, 0.25]]])  # class 2: never above 0.5
    out = refine_scores(scores, prompt_denoising=True)
    assert torch.equal(out[0, 2], torch.full((4,), DENOISED_SCORE))
    assert torch.equal(out[0, :2], scores[0, :2])
    assert torch.equal(refine_scores(scores, prompt_denoising=True, denoise_threshold=0.0), scores)
    # threshold 1: every class is below it, but the most confident (patch 1's class 1) stays
    out = refine_scores(scores, prompt_denoising=True, denoise_threshold=1.0)
    assert torch.equal(out[0, 1], scores[0, 1])
    assert (out[0, [0, 2]] == DENOISED_SCORE).all()
    assert (out.argmax(1) == 1).all()


def test_prompt_denoising_end_to_end_crafted_text():
    t = _refined_teacher(prompt_denoising=True)
    images = _images(2, seed=4)
    feats = t.dense_features(images)
    f = feats.flatten(2)  # (2, D, 24)
    blend = F.normalize(f[0, :, 0] + f[1, :, 13] + f.mean(dim=(0, 2)), dim=0)
    crafted = torch.stack([
        f[0, :, 0],   # image 0's patch 0: cosine 1 there, so probability ~1
        f[1, :, 13],  # image 1's patch 13: likewise
        blend,        # classes 2 and 3 are the same prompt: they split every patch's
        blend,        # probability equally, so neither can reach 0.5
    ])
    t.text_embeddings.copy_(F.normalize(crafted, dim=1))
    _, logits = t.dense_outputs(images)
    cos = _cosines(feats, t.text_embeddings)
    class_max = torch.softmax(100 * cos.double().flatten(2), dim=1).amax(2)  # (2, C)
    for i in range(2):
        below = set(torch.nonzero(class_max[i] < 0.5).flatten().tolist())
        below.discard(int(class_max[i].argmax()))
        removed = {c for c in range(4) if (logits[i, c] == DENOISED_SCORE).all()}
        assert removed == below
        assert {2, 3} <= removed and i not in removed  # crafted: 2, 3 split; class i certain somewhere
        kept = [c for c in range(4) if c not in removed]
        assert torch.allclose(logits[i, kept], cos[i, kept], atol=1e-6)
        assert not set(logits[i].argmax(0).flatten().tolist()) & removed


def test_prompt_denoising_keeps_most_confident_patch_class():
    """All classes below the threshold (near-identical prompts): only the argmax class of the
    image's most confident patch survives, and it becomes every patch's pseudo-label."""
    t = _refined_teacher(prompt_denoising=True, key_smoothing=True)
    images = _images(2, seed=5)
    feats = t.dense_features(images)
    base = F.normalize(feats.mean(dim=(0, 2, 3)), dim=0)
    g = torch.Generator().manual_seed(0)
    near = F.normalize(base + 0.002 * torch.randn(4, base.numel(), generator=g), dim=1)
    t.text_embeddings.copy_(near)
    cos = _cosines(feats, near).double().flatten(2)  # (2, C, N)
    prob = torch.softmax(100 * cos, dim=1)
    assert (prob.amax(dim=(1, 2)) < 0.5).all(), "crafted: every class below the threshold"
    _, logits = t.dense_outputs(images)
    for i in range(2):
        best_patch = prob[i].amax(0).argmax()
        keep = int(prob[i, :, best_patch].argmax())
        assert (logits[i, keep] > -1.5).all()
        others = [c for c in range(4) if c != keep]
        assert (logits[i, others] == DENOISED_SCORE).all()
        assert (logits[i].argmax(0) == keep).all()


def test_denoising_decided_on_raw_scores_before_smoothing():
    images = _images(2, seed=6)
    pd = _refined_teacher(prompt_denoising=True, denoise_threshold=0.9)
    both = _refined_teacher(prompt_denoising=True, key_smoothing=True, denoise_threshold=0.9)
    _, a = pd.dense_outputs(images)
    _, b = both.dense_outputs(images)
    removed_a = (a == DENOISED_SCORE).all(dim=(2, 3))
    removed_b = (b == DENOISED_SCORE).all(dim=(2, 3))
    assert torch.equal(removed_a, removed_b) and removed_a.any()
    assert torch.isfinite(b).all() and b.min() >= DENOISED_SCORE
    kept_b = b.masked_fill(removed_b[:, :, None, None], float("nan"))
    assert torch.nanmean(kept_b) > -1.1
    # removed classes are never a pseudo-label
    labels = b.argmax(1)
    for i in range(2):
        assert not set(labels[i].flatten().tolist()) & set(torch.nonzero(removed_b[i]).flatten().tolist())


def test_fingerprint_records_refinements(teacher):
    fp = teacher.fingerprint
    assert fp["key_smoothing"] is False and fp["prompt_denoising"] is False
    assert fp["denoise_threshold"] == 0.5 and fp["smoothing_threshold"] == 1.0
    cfg = TeacherConfig(TINY_MODEL_NAME, "none", (64, 96), key_smoothing=True, prompt_denoising=True,
                        denoise_threshold=0.4, smoothing_threshold=0.9)
    t = load_teacher(cfg, CLASSES, templates=FEW_TEMPLATES)
    assert t.fingerprint["key_smoothing"] is True and t.fingerprint["prompt_denoising"] is True
    assert t.fingerprint["denoise_threshold"] == 0.4 and t.fingerprint["smoothing_threshold"] == 0.9
    assert t.fingerprint != teacher.fingerprint
    json.dumps(t.fingerprint)
    # same weights, same features; the refinements only change the logits
    images = _images(1)
    assert torch.equal(t.dense_features(images), teacher.dense_features(images))
    assert not torch.equal(t.dense_outputs(images)[1], teacher.dense_outputs(images)[1])
    with pytest.raises(ValueError, match="denoise_threshold"):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, "none", (64, 96), denoise_threshold=2.0), CLASSES)
    with pytest.raises(ValueError, match="smoothing_threshold"):
        load_teacher(TeacherConfig(TINY_MODEL_NAME, "none", (64, 96), smoothing_threshold=-1.0), CLASSES)
