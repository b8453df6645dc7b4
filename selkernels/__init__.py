"""selkernels: fused kernels for the statistics of neural representations.

Class-conditional means and the class selectivity index (with backward) of activations, and the
drop-in selectivity regularizer of Leavitt & Morcos (ICLR 2021); streaming covariance and
eigen-spectrum statistics, and the 1/n spectral regularizer of Nassar et al. (NeurIPS 2020);
``selkernels.distributed`` computes them on the global batch across torch.distributed ranks;
:class:`ClassSelectivity` measures the class selectivity of a trained model over a whole dataset.
"""

from . import analysis, distributed, spectrum
from .covariance import StreamingCovariance
from .metrics import ClassSelectivity
from .ops import LabelSegments, check_labels, class_means, segment_labels, selectivity_from_means, selectivity_index
from .regularizers import SelectivityRegularizer, SpectralRegularizer
from .spectral_ops import spectral_penalty

__version__ = "0.1.0"

__all__ = [
    "LabelSegments",
    "segment_labels",
    "check_labels",
    "class_means",
    "selectivity_index",
    "selectivity_from_means",
    "SelectivityRegularizer",
    "ClassSelectivity",
    "StreamingCovariance",
    "spectrum",
    "spectral_penalty",
    "SpectralRegularizer",
    "analysis",
    "distributed",
]
