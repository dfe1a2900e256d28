"""LightningModules and the plain-torch maths they use; importing this lets YAML name them bare."""

from lightning_modules.detectors import DEUADetector, LaRE2Detector
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.laplace_fit import LaplaceFit

__all__ = ["DEUADetector", "FeatureExtractor", "LaRE2Detector", "LaplaceFit"]
