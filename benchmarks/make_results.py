"""Assemble benchmarks/RESULTS.md from the summary and each benchmark's latest figures in benchmarks/results/.

Each benchmark script writes its own ``results/bench_<name>.md`` (with the exact command and the date); this script
only concatenates them, in the order below, under ``results/_summary.md``.

    python benchmarks/make_results.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ORDER = [
    ("Loader: ArrowDataset + DataLoader vs HF datasets + torch DataLoader and the memory floor (issues 2, 17)",
     "bench_loader.md"),
    ("Dataset decomposition (issue 3)", "bench_dd.md"),
    ("Speech duration bucketing and packing vs Lhotse (issue 4)", "bench_speech.md"),
    ("TAS-Balanced (issue 5)", "bench_tas.md"),
    ("NGAME (issue 6)", "bench_ngame.md"),
    ("Immiscible noise (issue 7)", "bench_immiscible.md"),
    ("RegMix (issue 8)", "bench_regmix.md"),
    ("Mixture batches at scale (issue 8)", "bench_mixture.md"),
    ("Checked reads: first-touch checksum cost (issue 12)", "bench_integrity.md"),
    ("Recipe dry run: 1e5 steps, 8 domains (issue 16)", "bench_recipe.md"),
    ("Sampler plans at 1e7-1e9 rows, shard-local shuffles, streaming decompose (issue 15)", "bench_scale.md"),
    ("PackedDurationSampler: windowed vs exact packs (issue 15)", "bench_packing_scale.md"),
    ("TopicAwareBatchSampler: windowed vs exact batches, with and without pairs (issue 15)", "bench_tas_scale.md"),
    ("NGAMEBatchSampler: windowed vs exact clustering (issue 15)", "bench_ngame_scale.md"),
    ("DurationBucketSampler with 2D buckets: windowed vs exact (issue 15)", "bench_duration2d_scale.md"),
    ("Datasets on object storage: an epoch over S3 on loopback vs the local copy (issue 15)", "bench_remote.md"),
    ("Drop-in: PyTorch's own DataLoader test suite with datapipe.DataLoader (issue 18)", "dropin.md"),
    ("Refactors within noise: the plan samplers of two revisions side by side (issue 14)", "bench_revisions.md"),
]


def demote(text: str) -> str:
    """Push each section's headings two levels down so they nest under this file's headings."""
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


def main() -> None:
    parts = [(HERE / "results" / "_summary.md").read_text().rstrip()]
    for title, name in ORDER:
        path = HERE / "results" / name
        if path.exists():
            parts.append(f"## {title}\n\nFrom `benchmarks/results/{name}`.\n\n{demote(path.read_text().strip())}")
    (HERE / "RESULTS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
