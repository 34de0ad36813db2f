"""Decoders: `conf/model/decoder/*.yaml` build these."""

from .transformer import DecoderBlock, LinearAttention, SoftmaxAttention, TransformerDecoder

__all__ = ["DecoderBlock", "LinearAttention", "SoftmaxAttention", "TransformerDecoder"]
