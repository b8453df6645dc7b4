"""Representation analyses built on the streaming statistics.

* :func:`dimensionality` -- dimensionality of layer representations and of the change caused by
  input perturbations (:class:`GaussianNoise`, :class:`PGDAttack`), with the input-unit gradient
  variability (Leavitt & Morcos 2020);
* :func:`class_density` -- class-conditional Gaussian density models per layer and the two-mode
  summary of class fitting (Jamroz & Kurdziel 2023); :func:`fit_dp_mixture` for the paper's
  Dirichlet-process mixtures;
* :func:`ablation_curve` -- accuracy as the most class-selective (or random) units of a layer are
  zeroed (Morcos et al. 2018).

scikit-learn and matplotlib are imported only by the functions that need them. Note that the
package attribute ``dimensionality`` is the function; its module is
``selkernels.analysis.dimensionality`` in ``sys.modules``.
"""

from .ablation import AblationCurve, ablation_curve
from .density import (
    ClassConditionalGaussian,
    ClassDensityReport,
    DPMixtureModels,
    Projection,
    TwoModeSplit,
    class_density,
    fit_dp_mixture,
    two_mode_split,
)
from .dimensionality import DimensionalityReport, dimensionality
from .perturbations import GaussianNoise, PGDAttack

__all__ = [
    "dimensionality",
    "DimensionalityReport",
    "GaussianNoise",
    "PGDAttack",
    "class_density",
    "ClassDensityReport",
    "ClassConditionalGaussian",
    "Projection",
    "fit_dp_mixture",
    "DPMixtureModels",
    "two_mode_split",
    "TwoModeSplit",
    "ablation_curve",
    "AblationCurve",
]
