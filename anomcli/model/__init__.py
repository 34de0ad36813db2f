"""Pure-torch detectors, one file each; `conf/model/*.yaml` build them."""

from .dinomaly import Dinomaly

__all__ = ["Dinomaly"]
