"""The ``memetrace`` command: one verb per pipeline stage (PIMMI-style)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from memetrace import logs
from memetrace.context import Context
from memetrace.settings import Settings


def _context(ctx: click.Context) -> Context:
    return ctx.obj


@click.group()
@click.option("-v", "--verbose", count=True, help="-v: info logs, -vv: debug logs (JSON on stderr)")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="where the stores live (default: MEMETRACE_DATA_DIR or ./memetrace-data)")
@click.pass_context
def main(ctx: click.Context, verbose: int, data_dir: Path | None) -> None:
    """Find every copy of an image, whole or partial, and group the copies into clusters."""
    logs.configure(verbose)
    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    ctx.obj = Context(settings)


def _progress(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)


def run_index(c: Context, source: Path) -> dict:
    """index -> match the new images -> recluster; returns the run summary."""
    from clusterer.service import recluster
    from ingest.indexer import Indexer
    from ingest.sources import iter_directory, iter_list_file
    from matcher.matching import Matcher

    s = c.settings
    known = c.catalog.known_paths()
    if source.is_dir():
        c.catalog.set_meta("root", str(source.resolve()))
        items = [it for it in iter_directory(source, s.max_file_bytes) if it.key not in known]
    else:
        c.catalog.set_meta("root", str(source.resolve().parent))
        items = [it for it in iter_list_file(source, s.max_file_bytes, _url_reader(s)) if it.key not in known]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    indexer = Indexer(s, c.embedder, c.extractor, c.store, c.features, c.catalog)
    with _progress(len(items), "index") as bar:
        report = indexer.index(items, bar.update)
    timings["index_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    todo = c.catalog.unmatched()
    matcher = Matcher(s, c.store, c.features)
    with _progress(len(todo), "match") as bar:
        matches = matcher.match_stored(todo, bar.update)
    c.catalog.add_matches(matches)
    c.catalog.mark_matched(todo)
    timings["match_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    recluster(c.catalog, s.cluster_algorithm)
    timings["cluster_s"] = round(time.perf_counter() - t0, 2)
    return {"inputs": report.seen, "new_images": report.new_images, "duplicates": report.duplicates,
            "bad_files": report.bad, "new_matches": len(matches), **c.catalog.counts(), **timings}


def _url_reader(s: Settings):
    from ingest.fetch import Fetcher, FetchPolicy

    fetcher = Fetcher(FetchPolicy(max_bytes=s.max_file_bytes))

    def read(url: str) -> bytes:
        res = fetcher.fetch(url)
        if not res.ok or res.data is None:
            raise ValueError(f"download failed ({res.reason}): {res.detail}")
        return res.data

    return read


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.pass_context
def index(ctx: click.Context, source: Path) -> None:
    """Index a folder (recursive) or a text file of paths/URLs, match new images, recluster."""
    summary = run_index(_context(ctx), source)
    click.echo(json.dumps(summary, indent=2))


def _cluster_rows(c: Context):
    from clusterer.export import cluster_rows
    from clusterer.graph import build_graph

    cat = c.catalog
    nb_points = cat.images()
    g = build_graph(nb_points, cat.matches())
    return cluster_rows(g, cat.clusters(), cat.paths_by_image(), nb_points)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="clusters CSV (default: DATA_DIR/clusters.csv)")
@click.option("--html", "html_dir", type=click.Path(path_type=Path), default=None,
              help="write the HTML gallery into this folder")
@click.option("--link-dir", type=click.Path(path_type=Path), default=None,
              help="one folder of symlinks per cluster (clusters of 2+ images)")
@click.pass_context
def clusters(ctx: click.Context, out: Path | None, html_dir: Path | None, link_dir: Path | None) -> None:
    """Write the clusters: PIMMI-style CSV, optional HTML gallery and symlink folders."""
    from clusterer.export import write_csv, write_link_dir

    c = _context(ctx)
    rows = _cluster_rows(c)
    out = out or c.settings.data_dir / "clusters.csv"
    write_csv(rows, out)
    click.echo(f"clusters CSV: {out} ({len(rows)} rows)")
    if link_dir:
        root = Path(c.catalog.meta("root") or ".")
        click.echo(f"link folders: {write_link_dir(rows, root, link_dir)} in {link_dir}")
    if html_dir:
        from clusterer.gallery import write_gallery

        page = write_gallery(rows, c.features, html_dir)
        click.echo(f"gallery: {page}")
