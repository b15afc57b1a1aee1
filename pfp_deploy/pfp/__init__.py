"""PFP (Provable Filter Pruning, Liebenwein et al., ICLR 2020): score, allocate, select."""
from .sensitivity import is_dense_layer, sensitivity

__all__ = ["sensitivity", "is_dense_layer"]
