"""The ``memetrace`` command: one verb per pipeline stage (PIMMI-style)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from memetrace import logs
from memetrace.cli.context import Context
from memetrace.settings import Settings, unknown_env_names
from memetrace.errors import DependencyDown, StorageDenied
from memetrace.sqlite_file import IncompatibleFile

log = logging.getLogger("memetrace")


def _context(ctx: click.Context) -> Context:
    return ctx.obj


#: old verb -> the verb it became (accepted until 0.3, with a warning)
RENAMED_VERBS = {"clusters": "export"}


class _Group(click.Group):
    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in RENAMED_VERBS:
            log.warning(f"`memetrace {cmd_name}` is now `memetrace {RENAMED_VERBS[cmd_name]}`")
            cmd_name = RENAMED_VERBS[cmd_name]
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (IncompatibleFile, StorageDenied, DependencyDown) as exc:
            # a store file of an older format, an unwritable disk, a dependency down: one line that
            # names the file or service and what to do; -v shows the traceback
            if ctx.params.get("verbose"):
                raise
            raise click.ClickException(f"{exc} (-v for the traceback)") from exc


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="-v: info logs, -vv: debug logs (JSON on stderr)")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="where the stores live (default: MEMETRACE_DATA_DIR or ./memetrace-data)")
@click.pass_context
def main(ctx: click.Context, verbose: int, data_dir: Path | None) -> None:
    """Find every copy of an image, whole or partial, and group the copies into clusters."""
    logs.configure(verbose)
    for name, closest in unknown_env_names().items():
        log.warning(f"{name} is not a memetrace setting, ignored" + (f": did you mean {closest}?" if closest else ""))
    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    # a caller running the CLI in-process (a test, a notebook) may hand a loaded embedder as ``obj``
    ctx.obj = Context(settings, embedder=ctx.obj)


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.pass_context
def index(ctx: click.Context, source: Path) -> None:
    """Index a folder (recursive) or a text file of paths/URLs, match new images, recluster."""
    from memetrace.cli.batch import run_index

    summary = run_index(_context(ctx), source)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="clusters CSV (default: DATA_DIR/clusters.csv)")
@click.option("--html", "html_dir", type=click.Path(path_type=Path), default=None,
              help="write the HTML gallery into this folder")
@click.option("--link-dir", type=click.Path(path_type=Path), default=None,
              help="one folder of symlinks per cluster (clusters of 2+ images)")
@click.pass_context
def export(ctx: click.Context, out: Path | None, html_dir: Path | None, link_dir: Path | None) -> None:
    """Write the clusters of the indexed folders: PIMMI-style CSV, optional HTML gallery and symlink folders."""
    from memetrace.cli.batch import cluster_table
    from memetrace.clusterer.export import write_csv, write_link_dir

    c = _context(ctx)
    rows = cluster_table(c)
    out = out or c.settings.data_dir / "clusters.csv"
    write_csv(rows, out)
    click.echo(f"clusters CSV: {out} ({len(rows)} rows)")
    if link_dir:
        root = Path(c.catalog.meta("root") or ".")
        click.echo(f"link folders: {write_link_dir(rows, root, link_dir)} in {link_dir}")
    if html_dir:
        from memetrace.clusterer.gallery import write_gallery

        page = write_gallery(rows, c.features, html_dir)
        click.echo(f"gallery: {page}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def query(ctx: click.Context, images: tuple[Path, ...], as_json: bool) -> None:
    """Copies of the given image(s) among the indexed ones, with scores and cluster ids."""
    from memetrace.cli.batch import display_path
    from memetrace.matcher.query import CopyFinder
    from memetrace.imageio import BadImage

    c = _context(ctx)
    if not c.catalog.images():
        raise click.ClickException(f"nothing indexed in {c.settings.data_dir}: run `memetrace index FOLDER` first")
    finder = CopyFinder(c)
    root, clusters = c.catalog.meta("root"), c.graph_state.clusters()
    paths = {i: [display_path(p, root) for p in ps] for i, ps in c.catalog.paths_by_image().items()}
    results = []
    for path in images:
        try:
            image, copies = finder.find(path.read_bytes())
        except BadImage as exc:
            results.append({"query": str(path), "error": exc.reason, "detail": exc.detail, "matches": []})
            continue
        matches = [{"image_id": m.image_id, "paths": paths.get(m.image_id, []), "inliers": m.inliers, "kind": m.kind,
                    "similarity": m.similarity, "mirrored": m.mirrored, "cluster_id": clusters.get(m.image_id)}
                   for m in copies]
        results.append({"query": str(path), "image_id": image.image_id, "matches": matches})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        if "error" in r:
            click.echo(f"{r['query']}: not an indexable image ({r['error']}: {r['detail']})")
            continue
        click.echo(f"{r['query']}: {len(r['matches'])} cop{'y' if len(r['matches']) == 1 else 'ies'}")
        for m in r["matches"]:
            click.echo(f"  {m['inliers']:4d} inliers  {m['kind']:9s} cluster {m['cluster_id']}  {', '.join(m['paths'])}")


@main.command(name="eval")
@click.argument("ground_truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("clusters_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def eval_(ground_truth: Path, clusters_csv: Path) -> None:
    """Score a clusters CSV against a ground truth (PIMMI's cluster P/R/F1, query AP, pairwise F1)."""
    from memetrace.clusterer.evaluate import evaluate

    try:
        click.echo(json.dumps(evaluate(ground_truth, clusters_csv), indent=2))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts: images, paths, bad files (by reason), matches, clusters."""
    from memetrace.cli.batch import counts as store_counts

    c = _context(ctx)
    counts = store_counts(c)
    reasons: dict[str, int] = {}
    for _, reason, _ in c.catalog.bad_files():
        reasons[reason] = reasons.get(reason, 0) + 1
    out = {**counts, "bad_files_by_reason": reasons, **_ingest_counts(c),
           "data_dir": str(c.settings.data_dir)}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            click.echo(f"{k:20s} {v}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="where to build the demo corpus (default: DATA_DIR/demo-corpus)")
@click.pass_context
def demo(ctx: click.Context, out: Path | None) -> None:
    """The whole pipeline on a small corpus made from photos shipped with scikit-image."""
    from memetrace.clusterer.evaluate import evaluate
    from memetrace.clusterer.export import write_csv
    from memetrace.clusterer.gallery import write_gallery
    from memetrace.cli.batch import cluster_table, run_index
    from memetrace.cli.demo import make_demo_corpus

    c = _context(ctx)
    corpus = out or c.settings.data_dir / "demo-corpus"
    images = make_demo_corpus(corpus)
    click.echo(f"demo corpus: {images}")
    summary = run_index(c, images)
    rows = cluster_table(c)
    csv_path = c.settings.data_dir / "clusters.csv"
    write_csv(rows, csv_path)
    page = write_gallery(rows, c.features, c.settings.data_dir / "gallery")
    scores = evaluate(corpus / "ground_truth.csv", csv_path)
    click.echo(json.dumps({**summary, "cluster_f1": scores["cluster_f1"],
                           "cluster_precision": scores["cluster_precision"],
                           "cluster_recall": scores["cluster_recall"]}, indent=2))
    click.echo(f"clusters CSV: {csv_path}\ngallery: {page}")


def _ingest_counts(c: Context) -> dict:
    """Streaming-ingest counts, kept in Milvus (shared by every worker): occurrences, dead letters."""
    from memetrace.milvus import stored_dim

    empty = {"occurrences": 0, "deadlettered": 0, "deadlettered_by_reason": {}}
    uri = c.settings.resolved_milvus_uri()
    if "://" not in uri and not Path(uri).exists():
        return empty
    if stored_dim(c.milvus, c.milvus_config) is None:
        return empty
    posts = c.occurrences
    return {"occurrences": posts.count_occurrences(), "deadlettered": posts.count_dead_letters(),
            "deadlettered_by_reason": posts.dead_letters_by_reason()}


_MAX_IDLE = click.option("--max-idle", type=float, default=None,
                         help="exit 0 after this many seconds without a new message, counted from joining the "
                              "consumer group (default: run until SIGTERM)")


@main.command()
@_MAX_IDLE
@click.pass_context
def ingest(ctx: click.Context, max_idle: float | None) -> None:
    """Consume posts from Kafka: download, embed, store in Milvus, publish events (prints totals as JSON)."""
    from memetrace.cli.services import run_ingest

    worker = run_ingest(_context(ctx).settings, max_idle=max_idle)
    click.echo(json.dumps(worker.totals.as_dict()))


@main.command()
@_MAX_IDLE
@click.pass_context
def match(ctx: click.Context, max_idle: float | None) -> None:
    """Consume image events from Kafka, verify their copies, publish edges on the matches topic."""
    from memetrace.cli.services import run_match

    worker = run_match(_context(ctx).settings, max_idle=max_idle)
    click.echo(json.dumps({"images_matched": worker.matched, "edges_published": worker.published,
                           "stopped_by": worker.stopped_by}))


@main.command()
@click.option("--every", type=float, default=None,
              help="seconds between two reclusterings (default: MEMETRACE_CLUSTER_EVERY_S)")
@_MAX_IDLE
@click.pass_context
def cluster(ctx: click.Context, every: float | None, max_idle: float | None) -> None:
    """Consume image and match events, keep the graph, recluster periodically with stable ids."""
    from memetrace.cli.services import run_cluster

    s = _context(ctx).settings
    if every is not None and every <= 0:
        raise click.BadParameter("must be > 0", param_hint="--every")
    worker = run_cluster(s, every or s.cluster_every_s, max_idle=max_idle)
    run = worker.last_run
    click.echo(json.dumps({"clusters": run.clusters if run else 0, "images_clustered": run.images_clustered if run else 0,
                           "stopped_by": worker.stopped_by}))


@main.command()
@click.option("--host", default=None, help="default: MEMETRACE_API_HOST (127.0.0.1)")
@click.option("--port", type=int, default=None, help="default: MEMETRACE_API_PORT (8000)")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """The query API (OpenAPI docs at /docs) and the cluster gallery, over what is stored."""
    from memetrace.api.server import serve as serve_api

    c = _context(ctx)
    serve_api(c, host or c.settings.api_host, port or c.settings.api_port)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topic", default=None, help="default: MEMETRACE_KAFKA_POSTS_TOPIC")
@click.pass_context
def produce(ctx: click.Context, file: Path, topic: str | None) -> None:
    """Send FILE's lines to Kafka: JSON posts as-is, bare URLs wrapped as {"post_id", "url"}."""
    from memetrace.ingest.producer import produce_file

    s = _context(ctx).settings
    sent = produce_file(s, file, topic)
    click.echo(f"{sent} messages sent to {topic or s.kafka_posts_topic} on {s.kafka_bootstrap_servers}")
