"""Pure-torch detectors, one file each; `conf/model/*.yaml` build them."""

from .dinomaly import Dinomaly
from .gan import GANomaly
from .patchcore import PatchCore
from .vae import VAE

__all__ = ["Dinomaly", "GANomaly", "PatchCore", "VAE"]
