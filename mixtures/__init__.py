"""Which data, in what proportion, when: step schedules, RegMix, domain up-sampling at the end of training."""

from __future__ import annotations

from native._lazy import attach

_LAZY = {
    "mixtures.schedules": ("Constant", "DomainUpsampling", "Linear", "Piecewise"),
}
_MODULES = ("regmix", "schedules")

__getattr__, __dir__, __all__, _WHERE = attach(__name__, _LAZY, _MODULES)
