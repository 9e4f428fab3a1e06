"""The training-free dense-CLIP teachers (SCLIP, ClearCLIP, NACLIP), sliding windows and PAMR.

Each variant's dense logits are compared, on the same random tiny ViT and input, with a small
transcription of its authors' last-block code (the `_authors_*` functions below; the source of each
is named in its docstring). The transcriptions keep the authors' layout (LND tokens, heads folded
into the batch, explicit bmm + softmax) so that only the arithmetic is shared with our code.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip2scene.precompute.teacher.refine import DENOISED_SCORE, denoised_classes, neighbourhood_bias, pamr, refine_scores
from clip2scene.precompute.teacher.config import TEACHERS, TeacherConfig
from clip2scene.precompute.teacher.weights import TINY_MODEL_NAME, _check_dense_capable, _model_config
from clip2scene.precompute.teacher.maskclip import MaskCLIP, load_teacher, window_starts
from clip2scene.precompute.teacher.prompts import TEMPLATES
from tests.precompute.test_maskclip import _images, _reference_last_block_input

CLASSES = ("car", "road", "tree", "person")
FEW = TEMPLATES[:2]
TOL = dict(atol=2e-5, rtol=0)  # cosines in [-1, 1] of a 2-block width-64 ViT in float32


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


_LOADED: dict[TeacherConfig, MaskCLIP] = {}


def _teacher(name: str, size=(64, 96), **kw) -> MaskCLIP:
    """Tiny random teacher (seed 0: every variant shares the weights); built once per config."""
    cfg = TeacherConfig(model=TINY_MODEL_NAME, weights="none", image_size=size, teacher=name, **kw)
    if cfg not in _LOADED:
        _LOADED[cfg] = load_teacher(cfg, CLASSES, templates=FEW)
    return _LOADED[cfg]


# ------------------------------------------------------------------------------------------
# transcriptions of the authors' code (reference only; kept minimal)
# ------------------------------------------------------------------------------------------


def _authors_custom_attn(attn_layer, x, strategy: str, n_patches=None):
    """``custom_attn`` of the three releases, on LND tokens ``x`` (ln_1 already applied).

    Sources: wangf3014/SCLIP clip/model.py ``VisionTransformer.custom_attn`` (csa=True);
    mc-lan/ClearCLIP open_clip/transformer.py ``VisionTransformer.custom_attn``
    (model_type='ClearCLIP'); sinahmr/NACLIP clip/model.py ``VisionTransformer.custom_attn``
    (attn_strategy='naclip', with ``gaussian_window`` and ``get_attention_addition``).
    """
    num_heads = attn_layer.num_heads
    num_tokens, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if strategy == "csa":  # SCLIP
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1) + \
            F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    elif strategy == "clearclip":
        attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    elif strategy == "naclip":
        window_size = [side * 2 - 1 for side in n_patches]
        window = _authors_gaussian_window(*window_size, std=5.0)
        omega = _authors_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype)
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)
    else:
        raise ValueError(strategy)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def _authors_gaussian_window(dim1, dim2, std=1.0):
    """sinahmr/NACLIP clip/model.py ``VisionTransformer.gaussian_window``."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim,
                                 dtype=torch.float))
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def _authors_attention_addition(dim1, dim2, window):
    """sinahmr/NACLIP clip/model.py ``VisionTransformer.get_attention_addition`` (adjust_for_cls)."""
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
    return torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])


def _authors_dense_logits(visual, x_nld, grid, name: str, text: torch.Tensor) -> torch.Tensor:
    """Last block + head + logits as the releases compute them: (B, C, h, w).

    SCLIP: ``x = x + custom_attn(ln_1 x); x = x + mlp(ln_2 x)`` (clip/model.py
    ``VisionTransformer.forward``); ClearCLIP: ``x = custom_attn(ln_1 x)`` (ignore_residual=True,
    open_clip/transformer.py ``VisionTransformer.forward``); NACLIP: arch 'reduced',
    ``x = custom_attn(ln_1 x)`` (clip/model.py ``VisionTransformer.forward``). Then
    ``ln_post(x) @ proj``, class token dropped, features L2-normalised, ``@ text.T``
    (``forward_feature`` of clip_segmentor.py / clearclip_segmentor.py / naclip.py).
    """
    blk = visual.transformer.resblocks[-1]
    x = x_nld.permute(1, 0, 2)  # NLD -> LND
    strategy = {"sclip": "csa", "clearclip": "clearclip", "naclip": "naclip"}[name]
    if name == "sclip":
        x = x + _authors_custom_attn(blk.attn, blk.ln_1(x), strategy)
        x = x + blk.mlp(blk.ln_2(x))
    else:
        x = _authors_custom_attn(blk.attn, blk.ln_1(x), strategy, n_patches=grid)
    x = x.permute(1, 0, 2)  # LND -> NLD
    feats = visual.ln_post(x) @ visual.proj
    feats = feats[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ text.T
    return logits.permute(0, 2, 1).reshape(x.shape[0], -1, *grid)


# ------------------------------------------------------------------------------------------
# each variant equals its authors' code
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
@pytest.mark.parametrize("size", [(64, 96), (48, 80)])  # native 4x4 grid resized to non-square grids
def test_variant_equals_authors_code(name, size):
    teacher = _teacher(name, size)
    images = _images(2, *size, seed=3)
    x, grid = _reference_last_block_input(teacher.visual, images)
    with torch.no_grad():
        want = _authors_dense_logits(teacher.visual, x, grid, name, teacher.text_embeddings)
    feats, logits = teacher.dense_outputs(images)
    assert logits.shape == want.shape == (2, len(CLASSES), *grid)
    torch.testing.assert_close(logits, want, **TOL)
    torch.testing.assert_close(teacher.logits(feats.movedim(1, -1)).movedim(-1, 1), want, **TOL)


def test_variants_differ_and_maskclip_is_default():
    images = _images(1, seed=1)
    outs = {n: _teacher(n).dense_outputs(images)[1] for n in TEACHERS}
    assert TeacherConfig().teacher == "maskclip"
    names = list(outs)
    for i, a in enumerate(names):  # same weights (seed 0), different last blocks
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_neighbourhood_bias_equals_authors_addition():
    for grid in [(3, 5), (4, 4)]:
        window = _authors_gaussian_window(2 * grid[0] - 1, 2 * grid[1] - 1, std=5.0)
        torch.testing.assert_close(neighbourhood_bias(grid, 5.0), _authors_attention_addition(*grid, window),
                                   atol=1e-6, rtol=0)


def test_layer_scale_block_runs_every_variant():
    """A ViT with layer scale (as open_clip's ViT-M-16-alt): the attention branch is scaled by ls_1."""
    import open_clip.factory as oc_factory

    cfg = _model_config(TINY_MODEL_NAME)
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], ls_init_value=0.5)
    oc_factory._MODEL_CONFIGS["clip2scene-tiny-ls"] = cfg
    try:
        for name in TEACHERS:
            t = load_teacher(TeacherConfig(model="clip2scene-tiny-ls", weights="none", image_size=(64, 96), teacher=name),
                             CLASSES, templates=FEW)
            f, lg = t.dense_outputs(_images(1))
            assert torch.isfinite(lg).all() and f.shape == (1, 64, 4, 6)
    finally:
        del oc_factory._MODEL_CONFIGS["clip2scene-tiny-ls"]


# ------------------------------------------------------------------------------------------
# refinements on top of every variant
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEACHERS))
def test_refinements_on_every_variant(name):
    plain = _teacher(name)
    refined = _teacher(name, key_smoothing=True, prompt_denoising=True, denoise_threshold=0.6)
    images = _images(2, seed=5)
    _, raw = plain.dense_outputs(images)
    x, _ = plain._last_block_input(images)
    keys = plain._last_block_keys(x)
    b, c, h, w = raw.shape
    want = refine_scores(raw.reshape(b, c, h * w), keys, key_smoothing=True, prompt_denoising=True,
                         denoise_threshold=0.6).reshape(b, c, h, w)
    _, got = refined.dense_outputs(images)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the refinement changed something, and the denoising decision is that of the raw scores
    assert not torch.equal(got, raw)
    removed = denoised_classes(raw.reshape(b, c, -1), 0.6)
    assert ((got == DENOISED_SCORE).all(dim=(2, 3)) == removed).all()


# ------------------------------------------------------------------------------------------
# sliding windows
# ------------------------------------------------------------------------------------------


def test_window_starts_follow_slide_inference():
    assert window_starts(96, 32, 16) == [0, 16, 32, 48, 64]
    assert window_starts(80, 32, 32) == [0, 32, 48]  # last window flush with the end
    assert window_starts(64, 96, 48) == [0]  # window larger than the image: one, clipped
    assert window_starts(64, 64, 32) == [0]


@pytest.mark.parametrize("name", ["maskclip", "clearclip"])
def test_windowed_logits_are_window_means(name):
    whole = _teacher(name, (64, 96))
    tiled = _teacher(name, (64, 96), window=(32, 48), stride=(16, 32))
    images = _images(2, 64, 96, seed=7)
    feats, logits = tiled.dense_outputs(images)
    assert feats.shape == (2, 64, 4, 6) and logits.shape == (2, len(CLASSES), 4, 6)
    fsum = torch.zeros(2, 64, 4, 6)
    lsum = torch.zeros(2, len(CLASSES), 4, 6)
    count = torch.zeros(4, 6)
    for y in (0, 16, 32):
        for x in (0, 32, 48):
            f, lg = whole.dense_outputs(images[..., y:y + 32, x:x + 48])  # a crop through the plain teacher
            fsum[..., y // 16:y // 16 + 2, x // 16:x // 16 + 3] += f
            lsum[..., y // 16:y // 16 + 2, x // 16:x // 16 + 3] += lg
            count[y // 16:y // 16 + 2, x // 16:x // 16 + 3] += 1
    torch.testing.assert_close(logits, lsum / count, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats, F.normalize(fsum / count, dim=1), atol=1e-6, rtol=0)
    assert tiled.fingerprint["window"] == [32, 48] and tiled.fingerprint["stride"] == [16, 32]


def test_one_window_covering_the_image_is_the_whole_image():
    images = _images(1, seed=2)
    a = _teacher("sclip", key_smoothing=True).dense_outputs(images)
    b = _teacher("sclip", key_smoothing=True, window=(64, 96)).dense_outputs(images)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_windowed_refinements_decide_denoising_per_image():
    t = _teacher("naclip", window=(32, 32), prompt_denoising=True, key_smoothing=True, denoise_threshold=0.6)
    plain = _teacher("naclip", window=(32, 32))
    images = _images(2, seed=9)
    _, raw = plain.dense_outputs(images)
    _, got = t.dense_outputs(images)
    removed = denoised_classes(raw.flatten(2), 0.6)
    assert ((got == DENOISED_SCORE).all(dim=(2, 3)) == removed).all()
    kept = ~removed[:, :, None, None].expand_as(got)
    assert torch.isfinite(got).all() and (got[kept] > -1.5).all()


def test_window_validation():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _teacher("maskclip", window=(40, 40))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _teacher("maskclip", window=(32, 32), stride=(8, 8))
    with pytest.raises(ValueError, match="larger than the window"):
        TeacherConfig(window=(32, 32), stride=(48, 16))
    with pytest.raises(ValueError, match="without a window"):
        TeacherConfig(stride=(16, 16))
    with pytest.raises(ValueError, match="two positive integers"):
        TeacherConfig(window=(0, 32))
    with pytest.raises(ValueError, match="--teacher 'dino': unknown teacher"):
        TeacherConfig(teacher="dino")
    assert _teacher("maskclip", window=(48, 64)).stride == (16, 32)  # half the window, in whole patches


# ------------------------------------------------------------------------------------------
# PAMR
# ------------------------------------------------------------------------------------------


def _authors_pamr(x, mask, num_iter, dilations):
    """PAMR of sinahmr/NACLIP pamr.py (from visinf/1-stage-wseg): ``PAMR.forward`` with its
    ``LocalAffinityAbs``, ``LocalAffinityCopy`` and ``LocalStDev`` kernels, condensed."""
    def local(t, kernel):
        b, k, h, w = t.size()
        t = t.reshape(b * k, 1, h, w)
        outs = [F.conv2d(F.pad(t, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).view(b, k, -1, h, w)

    ring = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    diff = torch.zeros(8, 1, 3, 3)
    copy = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(ring):
        diff[i, 0, 1, 1] = 1
        diff[i, 0, r, c] = -1
        copy[i, 0, r, c] = 1
    std_k = torch.zeros(9, 1, 3, 3)
    for i in range(9):
        std_k[i, 0, i // 3, i % 3] = 1
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = local(x, std_k).std(2, keepdim=True)
    x = -local(x, diff).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (local(mask, copy) * x).sum(2)
    return mask


def test_pamr_equals_authors_code():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 40, 56, generator=g)
    scores = torch.randn(2, 4, 5, 7, generator=g)
    torch.testing.assert_close(pamr(image, scores, steps=3, dilations=(2, 4)),
                               _authors_pamr(image, scores, 3, (2, 4)), atol=1e-5, rtol=0)


def test_pamr_option_gives_pixel_logits():
    t = _teacher("naclip", pamr=True)
    assert _teacher("naclip").pamr is False and t.fingerprint["pamr"] is True
    f, lg = t.dense_outputs(_images(1))
    assert f.shape == (1, 64, 4, 6) and lg.shape == (1, len(CLASSES), 64, 96) and torch.isfinite(lg).all()


# ------------------------------------------------------------------------------------------
# backbones
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
                                   "ViT-bigG-14", "ViT-M-16-alt"])
def test_native_vit_backbones_are_accepted(model):
    _check_dense_capable(model, _model_config(model))  # config only: no weights built


@pytest.mark.parametrize("model,why", [
    ("EVA02-B-16", "timm image tower"), ("ViT-B-16-SigLIP", "timm image tower"),
    ("RN50", "ResNet"), ("coca_ViT-B-32", "attentional pooler"), ("ViT-L-14-CLIPA", "pools"),
])
def test_other_backbones_are_refused_in_one_line(model, why):
    with pytest.raises(NotImplementedError, match=why) as e:
        _check_dense_capable(model, _model_config(model))
    assert "\n" not in str(e.value) and model in str(e.value)


def test_patch14_backbone_with_non_square_input_and_windows():
    import open_clip.factory as oc_factory

    cfg = _model_config(TINY_MODEL_NAME)
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], patch_size=14, image_size=56)  # a tiny ViT-L-14 shape
    oc_factory._MODEL_CONFIGS["clip2scene-tiny-14"] = cfg
    try:
        t = load_teacher(TeacherConfig(model="clip2scene-tiny-14", weights="none", image_size=(56, 98), teacher="clearclip",
                                       window=(28, 42), stride=(14, 28)), CLASSES, templates=FEW)
        f, lg = t.dense_outputs(_images(1, 56, 98))
        assert f.shape == (1, 64, 4, 7) and lg.shape == (1, len(CLASSES), 4, 7)
        assert open_clip.get_model_config("clip2scene-tiny-14")["vision_cfg"]["patch_size"] == 14
    finally:
        del oc_factory._MODEL_CONFIGS["clip2scene-tiny-14"]
