"""Deprecated alias of :mod:`datapipe.immiscible` (immiscible noise is a collate-side tool, not a sampler).

Kept for one release so ``from samplers.immiscible import ImmiscibleCollate`` keeps working; it warns with a
``DeprecationWarning``. Import from ``datapipe.immiscible`` (or ``datapipe.ImmiscibleCollate``) instead. This is
the one place ``samplers`` reaches into ``datapipe``, and it goes with the alias.
"""

from __future__ import annotations

import warnings

from datapipe.immiscible import (METHODS, ImmiscibleCollate, assign_linear, knn_noise, knn_noise_exact,
                                 plain_noise)

__all__ = ["METHODS", "ImmiscibleCollate", "assign_linear", "knn_noise", "knn_noise_exact", "plain_noise"]

warnings.warn("samplers.immiscible moved to datapipe.immiscible; import from there (the old name goes in the "
              "next release)", DeprecationWarning, stacklevel=2)
