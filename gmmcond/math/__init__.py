"""The paper's math as pure functions on tensors: GMM expansion and W1 (Eqs. 1-8), NGMG (Eqs. 11-18)."""
from .gmm import (expansion_cdf, expansion_fit, expansion_means, expansion_pdf, expansion_sample,  # noqa: F401
                  normal_pdf, w1_expansion)
from .ngmg import (bce, density_learning, kernel_matrix, ngmg, ngmg_entropy, ngmg_entropy_categorical)  # noqa: F401
