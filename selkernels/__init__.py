"""selkernels: fused kernels for the statistics of neural representations.

Class-conditional means and the class selectivity index (with backward) of activations, and the
drop-in selectivity regularizer of Leavitt & Morcos (ICLR 2021); ``selkernels.distributed`` computes
them on the global batch across torch.distributed ranks.
"""
from . import distributed
from .ops import class_means, selectivity_from_means, selectivity_index
from .regularizers import SelectivityRegularizer

__version__ = "0.1.0"

__all__ = ["class_means", "selectivity_index", "selectivity_from_means", "SelectivityRegularizer"]
