"""flarc: low-rank factorization of deployed ONNX models.

The stages live in sub-packages: ``flarc.calib`` (statistics), ``flarc.rewrite``
(whitening, SVD, ranks, graph surgery), ``flarc.latency`` (per-rank timing) and
``flarc.export`` (engines, rank buckets, decoding runtime). ``flarc.pipeline`` runs them.
"""

from flarc.core.errors import BackendError, DataError, FlarcError, ModelError, OptionError
from flarc.core.version import __version__

__all__ = [
    "BackendError",
    "DataError",
    "FlarcError",
    "ModelError",
    "OptionError",
    "__version__",
]
