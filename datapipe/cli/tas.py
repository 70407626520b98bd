"""``datapipe tas``: TAS-Balanced data preparation (Hofstätter et al., SIGIR 2021): ingest TSVs, cluster queries."""

from __future__ import annotations

import click

from datapipe.cli._progress import progress_bar


@click.group("tas")
def tas() -> None:
    """Topic-aware sampling (TAS-Balanced): ingest query/pair TSVs and cluster query embeddings.

    \b
    Example:
      datapipe tas ingest queries.train.tsv pairs_with_teacher_scores.tsv --out tas_ds
      datapipe tas cluster query_emb.npy --k 2000 --out tas_ds/clusters.arrow
    """


@tas.command("ingest")
@click.argument("queries_tsv", type=click.Path(exists=True, dir_okay=False))
@click.argument("pairs_tsv", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset directory to create.")
@click.option("--tokenizer", default=None, help="Also tokenize queries: 'bytes' or a path to a tokenizer.json.")
@click.option("--shard-rows", default=65536, show_default=True, type=int, help="Rows per shard file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def ingest_cmd(queries_tsv, pairs_tsv, out, tokenizer, shard_rows, overwrite):
    """Write QUERIES_TSV (qid<TAB>text) as a dataset and PAIRS_TSV (s_pos<TAB>s_neg<TAB>qid<TAB>pid_pos<TAB>pid_neg)
    as OUT/pairs.arrow, the pair table of TopicAwareBatchSampler.

    \b
    Example:
      datapipe tas ingest queries.train.tsv pairs_with_teacher_scores.tsv --out tas_ds --tokenizer bytes
    """
    from datapipe.tas_ingest import ingest_tas, load_pair_table

    with progress_bar("writing queries") as update:  # errors: `Error: ...` from the group (datapipe.cli)
        path = ingest_tas(queries_tsv, pairs_tsv, out, tokenizer=tokenizer, shard_rows=shard_rows,
                          overwrite=overwrite, progress=update)
    pairs = load_pair_table(path)
    without = int((pairs.counts() == 0).sum())
    click.echo(f"wrote {path}: {pairs.num_queries} queries, {pairs.num_pairs} pairs "
               f"({without} queries without pairs)")


@tas.command("cluster")
@click.argument("source", type=click.Path(exists=True))
@click.option("--k", "k", required=True, type=int, help="Number of clusters (the paper: 2000 for MS MARCO).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Arrow file of cluster ids (column 'cluster'); centroids go to <stem>.centroids.npy.")
@click.option("--column", default=None, help="Embedding column when SOURCE is a dataset directory.")
@click.option("--niter", default=20, show_default=True, type=int, help="k-means iterations.")
@click.option("--seed", default=0, show_default=True, type=int, help="k-means seed.")
@click.option("--gpu", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Use the FAISS GPU build: auto (when a GPU is visible), yes (require one), no.")
def cluster_cmd(source, k, out, column, niter, seed, gpu):
    """Cluster query embeddings (SOURCE: an [n, d] .npy file or a dataset directory with --column) with FAISS
    k-means and write one cluster id per query.

    \b
    Example:
      datapipe tas cluster query_emb.npy --k 2000 --out clusters.arrow
      datapipe tas cluster tas_ds --column emb --k 2000 --out tas_ds/clusters.arrow --gpu yes
    """
    import numpy as np

    from datapipe.tas_ingest import cluster_embeddings

    flag = {"auto": "auto", "yes": True, "no": False}[gpu]
    with progress_bar("clustering", total=3) as update:
        done = [0]

        def step(_desc: str) -> None:
            update(done[0])
            done[0] += 1

        _, ids = cluster_embeddings(source, k, column=column, out=out, niter=niter, seed=seed, gpu=flag, step=step)
        update(3)
    sizes = np.bincount(ids, minlength=k)
    click.echo(f"wrote {out}: {len(ids)} queries in {k} clusters (sizes min {sizes.min()}, "
               f"median {int(np.median(sizes))}, max {sizes.max()})")


# `datapipe cluster ...`: the same command under the root group too (a user clusters before choosing a sampler)
cluster_top = click.Command("cluster", callback=cluster_cmd.callback, params=cluster_cmd.params,
                            help=cluster_cmd.help.replace("datapipe tas cluster", "datapipe cluster"),
                            short_help="Cluster embeddings with FAISS k-means (GPU when visible).")

COMMANDS = [tas, cluster_top]
