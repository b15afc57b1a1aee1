"""PFP (Provable Filter Pruning, Liebenwein et al., ICLR 2020): score, allocate, select."""
from .sensitivity import calibration_size, is_dense_layer, sensitivity

__all__ = ["sensitivity", "calibration_size", "is_dense_layer"]
