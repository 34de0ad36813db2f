"""The Dinomaly maths: attention, hard mining, scoring, smoothing, shapes."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomcli.model import Dinomaly
from anomcli.model.bottleneck import NoisyMLP
from anomcli.model.decoder import LinearAttention, SoftmaxAttention, TransformerDecoder
from anomcli.model.encoder import CNNEncoder, ViTEncoder
from anomcli.model.encoder.cnn import orthonormal_embedding
from anomcli.model.layers import SmoothUpsample, gaussian_kernel1d, top_fraction_mean
from anomcli.model.losses import global_cosine_loss, hard_mining_fraction, scale_easy_point_gradients

TINY_VIT = dict(model_name="vit_small_patch14_reg4_dinov2", input_size=56, pretrained=False,
                model_kwargs=dict(embed_dim=32, depth=10, num_heads=2))


def tiny_dinomaly(**kwargs) -> Dinomaly:
    torch.manual_seed(0)
    return Dinomaly(ViTEncoder(**TINY_VIT), partial(NoisyMLP), partial(TransformerDecoder), **kwargs)


def test_linear_attention_equals_its_explicit_formula():
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, num_heads=2, eps=1e-6).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    expected = torch.empty(2, 2, 5, 4, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            kv_sum = sum(torch.outer(phi(k[b, h, j]), v[b, h, j]) for j in range(5))  # [d, d]
            k_sum = sum(phi(k[b, h, j]) for j in range(5))
            for i in range(5):
                expected[b, h, i] = phi(q[b, h, i]) @ kv_sum / (phi(q[b, h, i]) @ k_sum + 1e-6)
    expected = attention.proj(expected.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attention(x), expected)


def test_softmax_attention_matches_multihead_reference():
    torch.manual_seed(0)
    attention = SoftmaxAttention(dim=8, num_heads=2)
    x = torch.randn(1, 4, 8)
    q, k, v = attention.qkv(x).reshape(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(attention(x), expected)


def _gradient_after_mining(p: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    decoded = torch.randn(2, 3, 4, 4, requires_grad=True)
    view = decoded * 1.0  # a non-leaf, as the decoder's group maps are
    distance = torch.rand(2, 1, 4, 4)
    scale_easy_point_gradients(view, distance, p, 0.1)
    view.sum().backward()
    return decoded.grad, distance


def test_hard_mining_scales_easy_points_by_a_tenth():
    grad, distance = _gradient_after_mining(0.5)
    threshold = distance.flatten().topk(16).values[-1]
    easy = (distance < threshold).expand_as(grad)
    assert easy.sum() == 16 * 3  # half of the 32 points, every channel
    torch.testing.assert_close(grad[easy], torch.full_like(grad[easy], 0.1))
    torch.testing.assert_close(grad[~easy], torch.ones_like(grad[~easy]))


def test_hard_mining_does_nothing_at_p_zero():
    grad, _ = _gradient_after_mining(0.0)
    torch.testing.assert_close(grad, torch.ones_like(grad))


def test_hard_mining_fraction_ramps_linearly():
    assert hard_mining_fraction(0) == 0.0
    assert hard_mining_fraction(500) == pytest.approx(0.45)
    assert hard_mining_fraction(1000) == pytest.approx(0.9)
    assert hard_mining_fraction(5000) == pytest.approx(0.9)


def test_global_cosine_loss_is_zero_for_identical_and_one_for_orthogonal_maps():
    a = torch.randn(2, 4, 3, 3)
    assert global_cosine_loss([a], [a.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.zeros(2, 4, 3, 3)
    b[:, 0] = 1.0
    c = torch.zeros(2, 4, 3, 3)
    c[:, 1] = 1.0
    assert global_cosine_loss([b, b], [c, b]).item() == pytest.approx(0.5)


def test_top_fraction_mean_scores_the_top_one_percent():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0, 0] = 5.0  # 1 % of 100 pixels = the single top pixel
    maps[1] = torch.arange(100.0).view(1, 10, 10)
    torch.testing.assert_close(top_fraction_mean(maps, 0.01), torch.tensor([5.0, 99.0]))
    torch.testing.assert_close(top_fraction_mean(maps, 0.05), torch.tensor([1.0, 97.0]))


def test_gaussian_kernel_and_blur_match_scipy():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 2 * int(4 * 4.0 + 0.5) + 1
    assert kernel.sum().item() == pytest.approx(1.0)
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    blurred = SmoothUpsample(40, 40, sigma=2.0)(torch.from_numpy(image)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(blurred, gaussian_filter(image, 2.0, mode="mirror", truncate=4.0), atol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
def test_smooth_upsample_equals_bilinear_resize_then_blur(align_corners):
    grid = torch.rand(2, 1, 7, 7)
    resized = F.interpolate(grid, size=(40, 40), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(SmoothUpsample(7, 40, sigma=0, align_corners=align_corners)(grid), resized)
    expected = np.stack([gaussian_filter(m, 2.0, mode="mirror", truncate=4.0) for m in resized.numpy()])
    smoothed = SmoothUpsample(7, 40, sigma=2.0, align_corners=align_corners)(grid)
    np.testing.assert_allclose(smoothed.numpy(), expected, atol=1e-6)


def test_smooth_upsample_leaves_out_a_blur_wider_than_the_map():
    maps = torch.rand(1, 1, 6, 6)
    torch.testing.assert_close(SmoothUpsample(6, 6, sigma=4.0)(maps), maps)


def test_orthonormal_embedding_preserves_cosine():
    embedding = orthonormal_embedding(5, 12, seed=3)
    x, y = torch.randn(7, 5), torch.randn(7, 5)
    torch.testing.assert_close(F.cosine_similarity(x @ embedding, y @ embedding, dim=1),
                               F.cosine_similarity(x, y, dim=1))


def test_vit_encoder_prunes_blocks_and_keeps_prefix_tokens():
    encoder = ViTEncoder(**TINY_VIT, taps=[1, 3])
    assert len(encoder.vit.blocks) == 4  # blocks after the last tap never run
    taps = encoder(torch.rand(2, 3, 56, 56))
    assert len(taps) == 2
    assert taps[0].shape == (2, encoder.num_prefix_tokens + 16, 32)
    assert encoder.num_prefix_tokens == 5  # class + 4 registers
    assert not any(p.requires_grad for p in encoder.parameters())


def test_vit_encoder_rejects_input_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ViTEncoder(**{**TINY_VIT, "input_size": 50})


def test_cnn_encoder_gives_tokens_of_one_grid_and_width():
    encoder = CNNEncoder("tf_efficientnet_lite0", taps=[3, 5, 8], input_size=64, grid_stride=8, pretrained=False)
    taps = encoder(torch.rand(2, 3, 64, 64))
    assert [t.shape for t in taps] == [(2, 64, 112)] * 3  # 8x8 grid, width of the widest tap
    assert encoder.num_prefix_tokens == 0


def test_dinomaly_shapes_and_stage_outputs():
    model = tiny_dinomaly().eval()
    images = torch.rand(3, 3, 56, 56)
    encoded, decoded = model(images)
    assert len(encoded) == len(decoded) == 2
    assert all(m.shape == (3, 32, 4, 4) for m in encoded + decoded)
    maps, scores = model.predict(images)
    assert maps.shape == (3, 1, 56, 56) and scores.shape == (3,)
    torch.testing.assert_close(scores, model.score(maps))
    assert model.training is False and model.encoder.training is False


def test_dinomaly_train_mode_keeps_the_encoder_frozen_and_dropout_on():
    model = tiny_dinomaly().train()
    assert model.encoder.training is False and model.bottleneck.training is True
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bottleneck", "decoder"}


def test_dinomaly_groups_pair_encoder_taps_with_decoder_blocks():
    model = tiny_dinomaly()
    tokens = [torch.full((1, 5 + 16, 32), float(i)) for i in range(8)]
    groups = model.group_maps(tokens, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert groups[0].mean().item() == pytest.approx(1.5) and groups[1].mean().item() == pytest.approx(5.5)
    with pytest.raises(ValueError, match="pair up"):
        tiny_dinomaly(encoder_groups=[[0]], decoder_groups=[[0], [1]])


def test_anomaly_map_is_zero_where_decoder_agrees_and_high_where_it_does_not():
    model = tiny_dinomaly()
    encoded = [torch.randn(1, 32, 4, 4)]
    decoded = [encoded[0].clone()]
    decoded[0][:, :, 3, 3] = -encoded[0][:, :, 3, 3]  # opposite direction at one point
    amap = model.anomaly_map(encoded, decoded)[0, 0]
    assert amap[:8, :8].max() < 0.05
    assert amap[48:, 48:].max() > 0.5


def test_anomaly_map_averages_the_groups_upsampled_and_smoothed():
    model = tiny_dinomaly()  # 4x4 grid, 56-px maps
    encoded = [torch.randn(2, 32, 4, 4) for _ in range(2)]
    decoded = [torch.randn(2, 32, 4, 4) for _ in range(2)]
    per_group = [F.interpolate(1 - F.cosine_similarity(e, d, dim=1).unsqueeze(1), size=(56, 56),
                               mode="bilinear", align_corners=True) for e, d in zip(encoded, decoded)]
    mean = torch.stack(per_group).mean(dim=0).numpy()
    expected = np.stack([gaussian_filter(m, model.upsample.sigma, mode="mirror", truncate=4.0) for m in mean])
    np.testing.assert_allclose(model.anomaly_map(encoded, decoded).numpy(), expected, atol=1e-5)
