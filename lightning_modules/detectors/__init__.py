"""Phase-2 detectors: DEUA and LaRE² (EGRE) over cached CLIP and diffusion-uncertainty maps."""

from lightning_modules.detectors.base import DetectorBase, DetectorOutput
from lightning_modules.detectors.deua import DEUADetector
from lightning_modules.detectors.lare2 import LaRE2Detector

__all__ = ["DEUADetector", "DetectorBase", "DetectorOutput", "LaRE2Detector"]
