"""Frozen pre-trained encoders: `conf/model/encoder/*.yaml` build these."""

from .cnn import CNNEncoder
from .pretrained import EncoderWeightsError, create_encoder_model
from .vit import ViTEncoder

__all__ = ["CNNEncoder", "EncoderWeightsError", "ViTEncoder", "create_encoder_model"]
