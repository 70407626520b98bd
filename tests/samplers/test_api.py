"""One sampler API: every batch sampler's constructor takes what its batches are made of (and a mixture's
schedule), then the budget of a batch, positionally or by name; every other option is keyword-only and spelled
the same way in every sampler (STYLE.md: "keyword-only options after the first argument or two")."""

from __future__ import annotations

import inspect

import pytest

import samplers

# (metadata..., budget): the only parameters that may be passed positionally
LEADING = {
    "RandomBatchSampler": ("num_rows", "batch_size"),
    "NGAMEBatchSampler": ("num_rows", "batch_size"),
    "TopicAwareBatchSampler": ("cluster_ids", "batch_size"),
    "TokenBudgetBatchSampler": ("lengths", "max_tokens"),
    "DurationBucketSampler": ("durations", "max_duration"),
    "PackedDurationSampler": ("durations", "max_duration"),
    "DecomposedBatchSampler": ("index", "tokens_per_batch"),
    "MixtureBatchSampler": ("domain_sizes", "schedule", "batch_size"),
    "ShapedMixtureBatchSampler": ("groups", "schedule", "batch_sizes"),
}
# options every sampler spells the same way (a sampler that has the idea has the name)
SHARED = ("seed", "rank", "world_size", "strict")
# names another sampler's vocabulary replaced; kept one release as deprecated keywords only
DEPRECATED = {"num_items", "incomplete"}
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def batch_samplers() -> list[str]:
    return sorted(n for n in samplers.__all__ if n.endswith("Sampler") and isinstance(getattr(samplers, n), type))


def test_the_table_lists_every_sampler():
    assert sorted(LEADING) == batch_samplers()


@pytest.mark.parametrize("name", sorted(LEADING))
def test_constructor_follows_the_one_vocabulary(name):
    params = list(inspect.signature(getattr(samplers, name).__init__).parameters.values())[1:]
    positional = tuple(p.name for p in params if p.kind in POSITIONAL)
    assert positional == LEADING[name], f"{name}: positional parameters {positional}, expected {LEADING[name]}"
    keyword = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(SHARED) <= keyword, f"{name} lacks {set(SHARED) - keyword}"
    assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params), name
    for p in params:
        assert p.name == p.name.lower() and not p.name.startswith("_"), (name, p.name)
        if p.name in DEPRECATED:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None, (name, p.name)


# samplers whose default cannot keep every row without breaking their contract: the default is None (drop, with a
# PlanWarning naming drop_last); True and False are the same choice as everywhere
DROP_BY_DEFAULT = {"DecomposedBatchSampler"}  # at most once per sequence and constant tokens per step (issue 3)


@pytest.mark.parametrize("name", sorted(LEADING))
def test_drop_last_has_one_meaning(name):
    """Where a sampler has ``drop_last``, it is keyword-only and its default keeps every row (``False``), as torch's
    samplers do, or is ``None`` where keeping every row by default would break the sampler's contract."""
    p = inspect.signature(getattr(samplers, name).__init__).parameters.get("drop_last")
    if p is not None:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p.default is (None if name in DROP_BY_DEFAULT else False), (name, p.default)
