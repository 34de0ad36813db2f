"""Pure-torch detectors, one file each; `conf/model/*.yaml` build them."""

from .dinomaly import Dinomaly
from .patchcore import PatchCore

__all__ = ["Dinomaly", "PatchCore"]
