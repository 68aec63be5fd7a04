"""The ``memetrace`` command: one verb per pipeline stage (PIMMI-style)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from memetrace import logs
from memetrace.cli.context import Context
from memetrace.settings import Settings, invalid_settings, unknown_env_names
from memetrace.errors import ConfigError, DependencyDown, StorageDenied
from memetrace.sqlite_file import IncompatibleFile

if TYPE_CHECKING:
    from memetrace.matcher.query import Copy, CopyFinder

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
        except (IncompatibleFile, StorageDenied, DependencyDown, ConfigError) as exc:
            # a store file of an older format, an unwritable disk, a dependency down, a bad setting,
            # port or data dir: one line that names it and what to do; -v shows the traceback
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
    try:
        settings = Settings(data_dir=data_dir) if data_dir else Settings()
    except ValidationError as exc:
        raise ConfigError("\n".join(invalid_settings(exc))) from exc
    # a caller running the CLI in-process (a test, a notebook) may hand a loaded embedder as ``obj``
    ctx.obj = Context(settings, embedder=ctx.obj)


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--posts", "posts_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV of the posts showing the files: path, post_id, posted_at, platform, author")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="threads decoding and verifying (default: MEMETRACE_PREPARE_THREADS, MEMETRACE_MATCH_THREADS)")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="skip files and folders whose path below the folder, or name, matches (repeatable)")
@click.option("--limit", type=click.IntRange(1), default=None, help="read at most N new or changed files this run")
@click.option("--follow-links", is_flag=True, help="enter symlinked folders (linked files are always read)")
@click.pass_context
def index(ctx: click.Context, sources: tuple[Path, ...], posts_csv: Path | None, workers: int | None,
          exclude: tuple[str, ...], limit: int | None, follow_links: bool) -> None:
    """Index SOURCES (folders, recursive; image files; text files of paths/URLs, one per line), re-read
    files changed in place, match the new images, recluster. Prints the summary as JSON, then the
    first bad files and the missing ones (removed by `memetrace prune`) on stderr."""
    from memetrace.cli.batch import IndexOptions, exit_if_console, index_notes, run_index
    from memetrace.cli.posts import PostsFileError
    from memetrace.ingest.sources import UnsupportedInput

    c = _context(ctx)
    try:
        summary = run_index(c, sources, posts_csv, options=IndexOptions(workers, exclude, limit, follow_links))
    except (PostsFileError, UnsupportedInput) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary, indent=2))
    for line in index_notes(c, summary):
        click.echo(line, err=True)
    exit_if_console(c)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def remove(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """Remove indexed files or URLs (a folder: every file indexed below it) from every store; their
    images leave their clusters. Prints the summary as JSON."""
    from memetrace.cli.batch import remove_paths

    summary = remove_paths(_context(ctx), paths)
    click.echo(json.dumps(summary, indent=2))
    for given in summary["not_indexed"]:
        click.echo(f"{given}: not indexed in {_context(ctx).settings.data_dir}, nothing removed", err=True)


@main.command()
@click.pass_context
def prune(ctx: click.Context) -> None:
    """Remove the indexed files that no longer exist (as `memetrace remove` would). Prints the summary as JSON."""
    from memetrace.cli.batch import prune as prune_missing

    click.echo(json.dumps(prune_missing(_context(ctx)), indent=2))


@main.command()
@click.option("--yes", is_flag=True, help="do not ask")
@click.pass_context
def reset(ctx: click.Context, yes: bool) -> None:
    """Delete everything in the data dir (refused for a folder that is not a memetrace data dir, or
    while another process serves its Milvus Lite); a Milvus server or S3 bucket set by
    MEMETRACE_MILVUS_URI / MEMETRACE_FEATURE_STORE is not touched."""
    from memetrace.cli.batch import reset as reset_stores

    c = _context(ctx)
    data_dir = c.settings.data_dir
    if not yes:
        click.confirm(f"Delete everything in {data_dir}?", abort=True)
    try:
        deleted = reset_stores(c)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{data_dir}: {len(deleted)} entr{'y' if len(deleted) == 1 else 'ies'} deleted")


@main.command(name="bad-files")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header: path, reason, detail")
@click.pass_context
def bad_files(ctx: click.Context, as_csv: bool) -> None:
    """Every file `index` could not index, with the reason (read again by the next `index`)."""
    import csv
    import sys

    from memetrace.cli.tables import bad_file_rows

    rows = bad_file_rows(_context(ctx).catalog)
    if as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(["path", "reason", "detail"])
        w.writerows(rows)
        return
    for path, reason, detail in rows:
        click.echo(f"{path}\t{reason}" + (f"\t{detail}" if detail else ""))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="clusters file (default: DATA_DIR/clusters.csv, .json or .parquet)")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "parquet"]), default=None,
              help="csv: PIMMI's columns; json: clusters with their members; parquet: the CSV's rows, typed "
                   "(needs memetrace[parquet]). Default: --out's suffix, else csv")
@click.option("--html", "html_dir", type=click.Path(path_type=Path), default=None,
              help="write the HTML gallery into this folder")
@click.option("--link-dir", type=click.Path(path_type=Path), default=None,
              help="one folder of symlinks per cluster (clusters of 2+ images)")
@click.pass_context
def export(ctx: click.Context, out: Path | None, fmt: str | None, html_dir: Path | None,
           link_dir: Path | None) -> None:
    """Write the clusters of the indexed folders: CSV (PIMMI's), JSON or Parquet, optional HTML gallery and
    symlink folders."""
    from memetrace.cli.tables import cluster_table
    from memetrace.clusterer.export import MissingExtra, format_of, write_clusters, write_link_dir

    c = _context(ctx)
    rows = cluster_table(c)
    fmt = fmt or (format_of(out) if out else "csv")
    out = out or c.settings.data_dir / f"clusters.{fmt}"
    try:
        write_clusters(rows, out, fmt)
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"clusters {fmt.upper()}: {out} ({len(rows)} rows)")
    stored = cluster_table(c, absolute=True) if link_dir or html_dir else []  # the same rows, paths as stored
    if link_dir:
        targets = [r.path for r in stored]  # each file below its own root
        click.echo(f"link folders: {write_link_dir(rows, Path('/'), link_dir, targets=targets)} in {link_dir}")
    if html_dir:
        from memetrace.clusterer.gallery import thumb_name, write_gallery
        from memetrace.tree_html import tree_section

        trees = tree_section(c.trees, c.occurrences, lambda i: f"thumbs/{thumb_name(i)}")
        # absolute paths: each thumbnail links to its file, the tooltip shows where it is
        page = write_gallery(stored, c.features, html_dir, log=c.occurrences, hooks=[trees])
        click.echo(f"gallery: {page}")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def query(ctx: click.Context, images: tuple[str, ...], as_json: bool) -> None:
    """Copies of the given image(s) among the indexed ones, with scores and cluster ids. Each IMAGE is
    a file, or the id of an indexed image (searched with its stored vectors and keypoints; a file also
    searches with grid windows, so it may find a few more partial copies)."""
    from memetrace.cli.tables import display_paths, stored_images
    from memetrace.matcher.query import CopyFinder, describe_geometry

    c = _context(ctx)
    if not c.catalog.images() and not stored_images(c):  # the streaming ingest stores no catalog rows
        raise click.ClickException(f"nothing indexed in {c.settings.data_dir}: run `memetrace index FOLDER` first")
    finder = CopyFinder(c)
    clusters, paths = c.graph_state.clusters(), display_paths(c.catalog)
    results = []
    for arg in images:
        image_id, copies, error = _find_copies(finder, arg, c.settings.data_dir)
        if error is not None:
            results.append({"query": arg, **error, "matches": []})
            continue
        matches = [{"image_id": m.image_id, "paths": paths.get(m.image_id, []), "inliers": m.inliers, "kind": m.kind,
                    "similarity": m.similarity, "mirrored": m.mirrored, "cluster_id": clusters.get(m.image_id),
                    "geometry": m.geometry.to_dict() if m.geometry else None}
                   for m in copies]
        results.append({"query": arg, "image_id": image_id, "matches": matches})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        if "error" in r:
            click.echo(f"{r['query']}: {r['message']}")
            continue
        click.echo(f"{r['query']}: {len(r['matches'])} cop{'y' if len(r['matches']) == 1 else 'ies'}")
        for m in r["matches"]:
            click.echo(f"  {m['inliers']:4d} inliers  {m['kind']:9s} cluster {m['cluster_id']}  {', '.join(m['paths'])}"
                       f"{describe_geometry(m['geometry'])}")


def _find_copies(finder: CopyFinder, arg: str, data_dir: Path) -> tuple[int, list[Copy], dict[str, str] | None]:
    """(query id, its copies, None) of a file, else of an indexed image's id; or (-1, [], the error entry)."""
    from memetrace.imageio import BadImage
    from memetrace.matcher.stored import FeaturesMissing, NotStored, features_missing_hint, file_or_id, not_stored_hint

    try:
        named = file_or_id(arg)
        if isinstance(named, Path):
            image, copies = finder.find(named.read_bytes())
            return image.image_id, copies, None
        return named, finder.find_stored(named)[1], None
    except BadImage as exc:
        return -1, [], {"error": exc.reason, "detail": exc.detail,
                        "message": f"not an indexable image ({exc.reason}: {exc.detail})"}
    except NotStored:
        return -1, [], {"error": "unknown_image", "detail": "", "message": not_stored_hint(arg, data_dir)}
    except FeaturesMissing:
        return -1, [], {"error": "features_missing", "detail": "", "message": features_missing_hint(arg)}


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("pair.png"), show_default=True,
              help="the PNG to write")
@click.pass_context
def explain(ctx: click.Context, a: str, b: str, out: Path) -> None:
    """Draw why A and B match (paths or indexed image ids): both side by side, the verified keypoint
    pairs joined, the shared region boxed. Exit status 1 (picture still written) when they do not match."""
    from memetrace.imageio import BadImage, DecodeLimits
    from memetrace.matcher.explain import caption, png, side_of_argument
    from memetrace.matcher.stored import FeaturesMissing, NotStored, features_missing_hint, not_stored_hint
    from memetrace.matcher.verify import VerifyConfig

    c = _context(ctx)
    limits = DecodeLimits.from_settings(c.settings)
    sides = []
    for arg in (a, b):
        try:
            sides.append(side_of_argument(arg, c, limits))
        except NotStored:
            raise click.ClickException(not_stored_hint(arg, c.settings.data_dir)) from None
        except FeaturesMissing:
            raise click.ClickException(features_missing_hint(arg)) from None
        except BadImage as exc:
            raise click.ClickException(f"{arg}: not an image ({exc.reason}: {exc.detail})") from None
    data, e = png(*sides, VerifyConfig.from_settings(c.settings), c.settings.thumbnail_side)
    out.write_bytes(data)
    if e.geometry is None:
        click.echo(f"{a} and {b}: no verified match (MEMETRACE_MIN_INLIERS, MEMETRACE_MIN_COVERAGE decide); "
                   f"the pair is drawn in {out}", err=True)
        ctx.exit(1)
    click.echo(f"{out}: {caption(e)}")


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file to write (default: stdout)")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "graphml"]), default=None,
              help="default: from --out's extension, else csv")
@click.pass_context
def matches(ctx: click.Context, out: Path | None, fmt: str | None) -> None:
    """The verified edges (image pairs, inliers, kind, geometry when stored) for graph tools."""
    from memetrace.cli.tables import display_paths
    from memetrace.cli.edges import FORMATS, rows

    c = _context(ctx)
    fmt = fmt or (out.suffix.lstrip(".").lower() if out and out.suffix.lstrip(".").lower() in FORMATS else "csv")
    path_of = {i: ps[0] for i, ps in display_paths(c.catalog).items() if ps}
    edges = rows(c.graph_state.matches(), path_of)
    if out is None:
        click.echo(FORMATS[fmt](edges), nl=False)
        return
    out.write_text(FORMATS[fmt](edges))
    click.echo(f"{out}: {len(edges)} edges ({fmt})", err=True)


@main.command(name="eval")
@click.argument("ground_truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("clusters_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def eval_(ground_truth: Path, clusters_csv: Path) -> None:
    """Score a clusters CSV against a ground truth (PIMMI's cluster P/R/F1, query AP, pairwise F1,
    copy-with-original rate per transform family).

    GROUND_TRUTH columns: path, group_id (empty: a distractor, an image with no copies), and
    optionally role (original | copy | distractor: a distractor never forms a group, whatever its
    group_id) and transform (the family of a copy; "a > b" counts as "chain"); others are ignored.
    Paths are relative to the ground truth's folder.

    CLUSTERS_CSV columns: path, cluster_id (as `memetrace export` writes them); a path may also be
    absolute or a bare file name; an image absent or with an empty cluster_id is a singleton.
    """
    from memetrace.clusterer.evaluate import evaluate

    try:
        click.echo(json.dumps(evaluate(ground_truth, clusters_csv), indent=2))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts of what is stored, whichever of `index` or the streaming services stored it: images and
    occurrences (Milvus), keypoints, matches and clusters, paths and bad files (by reason), dead letters."""
    from memetrace.cli.tables import stored_counts

    out = stored_counts(_context(ctx))
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            click.echo(f"{k:22s} {json.dumps(v) if isinstance(v, dict) else v}")


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="parents file (default: DATA_DIR/parents.<format>)")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "graphml"]), default="csv", show_default=True)
@click.pass_context
def tree(ctx: click.Context, out: Path | None, fmt: str) -> None:
    """Write each cluster's derivation tree: path,parent_path,cluster_id,edit,confidence,first_seen, then the
    first post's first_post_id,platform,author,meta."""
    from memetrace.cli.posts import tree_table
    from memetrace.clusterer.tree_export import write_tree

    c = _context(ctx)
    rows = tree_table(c)
    out = write_tree(rows, out or c.settings.data_dir / f"parents.{fmt}", fmt)
    click.echo(f"trees: {out} ({len(rows)} images, {sum(not r.parent_path for r in rows)} roots)")


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
    page = write_gallery(cluster_table(c, absolute=True), c.features, c.settings.data_dir / "gallery",
                         log=c.occurrences)
    scores = evaluate(corpus / "ground_truth.csv", csv_path)
    click.echo(json.dumps({**summary, "cluster_f1": scores["cluster_f1"],
                           "cluster_precision": scores["cluster_precision"],
                           "cluster_recall": scores["cluster_recall"]}, indent=2))
    click.echo(f"clusters CSV: {csv_path}\ngallery: {page}")


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
    import dataclasses

    from memetrace.api.server import serve as serve_api

    c = _context(ctx)
    # the API's reads need not wait for writes made in the last instant; the workers' reads stay Strong
    c.milvus_config = dataclasses.replace(c.milvus_config, read_consistency=c.settings.api_read_consistency)
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
