"""The Python API, for notebooks and scripts: ``memetrace.open(data_dir)`` returns a :class:`Library`.

A Library is one data dir opened in this process, with the stores and the pipeline of the CLI:
it composes what the verbs use (:class:`~memetrace.cli.context.Context`, ``run_index``,
:class:`~memetrace.matcher.query.CopyFinder`, ``cluster_table`` and the clusterer's exports) and
adds only Python shapes: typed query results, and :class:`Table`, rows a user hands to pandas
(``table.to_pandas()``, ``pd.DataFrame(table.rows)``) without memetrace depending on pandas.

Paths in results are shown as the CLI shows them: relative to the folder each file was indexed
from, URLs as they are. docs/python-api.md is the reference.
"""

from __future__ import annotations

import difflib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from memetrace.cli.context import Context
from memetrace.settings import Settings

if TYPE_CHECKING:  # numpy, PIL, pandas and the stages load when used: `import memetrace` stays light
    import pandas

    from memetrace.clusterer.export import ClusterRow
    from memetrace.matcher.query import Copy, CopyFinder
    from memetrace.models import Geometry

#: what :meth:`Library.query` accepts: a file path, encoded bytes, an RGB(A)/gray uint8 array or a PIL image
ImageLike = Any


def open_library(data_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Library:
    """The Library of ``data_dir`` (None: the CLI's, ``MEMETRACE_DATA_DIR`` or ``./memetrace-data``);
    ``overrides`` are settings by their field names (``min_inliers=20``), over the ``MEMETRACE_*``
    environment. An unknown name is refused."""
    known = list(Settings.model_fields)
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise TypeError(f"{name!r} is not a memetrace setting" + (f": did you mean {close[0]!r}?" if close else "")
                            + " (docs/settings.md lists them)")
    if data_dir is not None:
        overrides["data_dir"] = Path(data_dir)
    return Library(Context(Settings(**overrides)))


@dataclass(frozen=True)
class Table(Sequence[dict[str, Any]]):
    """Rows of one shape: a sequence of dicts with the keys ``columns``, in that order.

    ``table.to_pandas()`` makes a DataFrame (pandas imported then; it is not a dependency of
    memetrace); ``pd.DataFrame(table.rows)`` and ``pd.DataFrame(table)`` work as well."""

    columns: tuple[str, ...]
    rows: list[dict[str, Any]]

    @classmethod
    def of(cls, items: Sequence[Any], item_type: type) -> Table:
        """A table of dataclass instances of ``item_type``, one column per field."""
        names = tuple(f.name for f in fields(item_type))
        return cls(names, [{n: getattr(item, n) for n in names} for item in items])

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> Table: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | Table:
        return Table(self.columns, self.rows[i]) if isinstance(i, slice) else self.rows[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def column(self, name: str) -> list[Any]:
        if name not in self.columns:
            raise KeyError(f"no column {name!r}: the columns are {', '.join(self.columns)}")
        return [r[name] for r in self.rows]

    def to_pandas(self) -> pandas.DataFrame:
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("Table.to_pandas() needs pandas: pip install pandas (or use table.rows)") from exc
        return pd.DataFrame(self.rows, columns=list(self.columns))

    def __repr__(self) -> str:
        """The first rows, aligned: what a notebook or a terminal shows."""
        shown = [[str(r[c]) for c in self.columns] for r in self.rows[:10]]
        widths = [min(40, max([len(c), *(len(row[i]) for row in shown)])) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w)[:w] for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.ljust(w)[:w] for v, w in zip(row, widths)) for row in shown]
        more = f"\n... {len(self.rows) - len(shown)} more rows" if len(self.rows) > len(shown) else ""
        return "\n".join(lines) + more + f"\n[{len(self.rows)} rows x {len(self.columns)} columns]"


@dataclass(frozen=True)
class QueryMatch:
    """One indexed image that shares content with the query."""

    image_id: int
    paths: tuple[str, ...]  # the files that decoded to it
    cluster_id: int | None  # None: not clustered yet
    inliers: int  # keypoints the geometric verification kept
    kind: str  # full | partial | identical (the query's very bytes are indexed)
    similarity: float  # descriptor similarity of the candidate search
    mirrored: bool
    geometry: Geometry | None  # where the query's content lies in the copy (boxes, scale, rotation)


@dataclass(frozen=True)
class QueryResult:
    """The indexed copies of one queried image."""

    query: str  # the path queried, or a description of the bytes or array
    image_id: int  # the query's content id (the id it would get if indexed)
    matches: tuple[QueryMatch, ...]  # best first

    @property
    def best(self) -> QueryMatch | None:
        return self.matches[0] if self.matches else None

    def table(self) -> Table:
        return Table.of(self.matches, QueryMatch)

    def __repr__(self) -> str:
        """One line: what was queried, how many copies, the best one (``table()`` shows them all)."""
        n = len(self.matches)
        best = self.best
        shown = (f", best: {best.kind}, {best.inliers} inliers, cluster {best.cluster_id}, {', '.join(best.paths)}"
                 if best else "")
        return f"<QueryResult {self.query}: {n} cop{'y' if n == 1 else 'ies'}{shown}>"


class Library:
    """One data dir opened in this process; close it (or use ``with``) to release its files. Other
    memetrace processes may use the data dir meanwhile (memetrace.lite_server)."""

    def __init__(self, context: Context) -> None:
        """``context``: the components to use (``memetrace.open`` builds one from settings)."""
        self._context: Context | None = context
        self._finder: CopyFinder | None = None

    @property
    def context(self) -> Context:
        if self._context is None:
            raise RuntimeError("this memetrace library is closed: memetrace.open(data_dir) again")
        return self._context

    @property
    def data_dir(self) -> Path:
        return self.context.settings.data_dir

    def index(self, *paths: str | os.PathLike[str], posts: str | os.PathLike[str] | None = None,
              progress: bool = False, **options: Any) -> dict[str, Any]:
        """Index folders (recursive), image files and list files of paths/URLs; re-read the files
        changed in place, match the new images, recluster. Returns the summary ``memetrace index``
        prints. ``posts``: a CSV of the posts showing the files (``memetrace index --posts``);
        ``progress``: tqdm bars on stderr; ``options``: ``workers``, ``exclude`` (globs), ``limit``,
        ``follow_links``, as the CLI flags."""
        from memetrace.cli.batch import IndexOptions, run_index

        if not paths:
            raise TypeError("index() needs at least one folder, image file or list file")
        return run_index(self.context, [Path(p) for p in paths], Path(posts) if posts else None,
                         show_progress=progress, options=IndexOptions(**options))

    def remove(self, *paths: str | os.PathLike[str]) -> dict[str, Any]:
        """Forget indexed files or URLs (a folder: every file indexed below it), as ``memetrace
        remove``: images no file shows any more leave every store and their clusters."""
        from memetrace.cli.batch import remove_paths

        return remove_paths(self.context, [os.fspath(p) for p in paths])

    def prune(self) -> dict[str, Any]:
        """Forget the indexed files that no longer exist, as ``memetrace prune``."""
        from memetrace.cli.batch import prune

        return prune(self.context)

    def query(self, image: ImageLike) -> QueryResult:
        """The indexed copies of ``image``: a path, encoded bytes (JPEG, PNG...), a numpy uint8 array
        (H x W gray, H x W x 3 RGB, H x W x 4 RGBA; RGB order, not OpenCV's BGR) or a PIL image.
        Raises :class:`memetrace.imageio.BadImage` when it cannot be decoded or is too small."""
        data, label = image_bytes(image)
        decoded, copies = self._copy_finder().find(data)
        return self._result(label, decoded.image_id, copies)

    def copies(self, image_id: int) -> QueryResult:
        """The copies of an indexed image (itself left out), from its stored vectors and keypoints, as
        ``memetrace query ID``. Raises :class:`memetrace.matcher.stored.NotStored` (no such image),
        :class:`memetrace.matcher.stored.FeaturesMissing` (its keypoints are gone)."""
        _, copies = self._copy_finder().find_stored(image_id)
        return self._result(f"image {image_id}", image_id, copies)

    def _copy_finder(self) -> CopyFinder:
        from memetrace.matcher.query import CopyFinder

        self._finder = self._finder or CopyFinder(self.context)
        return self._finder

    def _result(self, label: str, image_id: int, copies: Sequence[Copy]) -> QueryResult:
        from memetrace.cli.tables import display_paths

        c = self.context
        clusters, paths = c.graph_state.clusters(), display_paths(c.catalog)
        matches = tuple(QueryMatch(m.image_id, tuple(paths.get(m.image_id, [])), clusters.get(m.image_id),
                                   m.inliers, m.kind, m.similarity, m.mirrored, m.geometry) for m in copies)
        return QueryResult(label, image_id, matches)

    def members(self, cluster_id: int | None = None) -> Table:
        """One row per indexed file with its cluster (the columns of ``memetrace export``'s CSV),
        biggest cluster first; ``cluster_id``: only that cluster's."""
        from memetrace.clusterer.export import ClusterRow

        rows = [r for r in self._rows() if cluster_id is None or r.cluster_id == cluster_id]
        return Table.of(rows, ClusterRow)

    def clusters(self, min_size: int = 2) -> Table:
        """One row per cluster of at least ``min_size`` images (the default: groups of copies, as
        ``stats`` counts them; 1 adds the images copied nowhere), biggest first: its id, images,
        files, quality (edge density) and paths."""
        from memetrace.clusterer.export import grouped

        return Table(("cluster_id", "images", "files", "quality", "paths"),
                     [{"cluster_id": g["cluster_id"], "images": g["images"], "files": len(g["members"]),
                       "quality": g["quality"], "paths": [m["path"] for m in g["members"]]}
                      for g in grouped(self._rows()) if g["images"] >= min_size])

    def bad_files(self) -> Table:
        """The files that could not be indexed: path, reason (a short code), detail."""
        from memetrace.cli.tables import bad_file_rows

        return Table(("path", "reason", "detail"), [{"path": p, "reason": r, "detail": d}
                                                    for p, r, d in bad_file_rows(self.context.catalog)])

    def stats(self) -> dict[str, Any]:
        """What the stores hold, as ``memetrace stats --json``: images, occurrences, paths, bad files,
        matches, clusters (of 2+ images)..."""
        from memetrace.cli.tables import stored_counts

        return stored_counts(self.context)

    def export(self, out: str | os.PathLike[str], format: str | None = None) -> Path:
        """Write the clusters to ``out`` as csv, json or parquet (default: by ``out``'s suffix, else
        csv), as ``memetrace export --format`` does; returns the path written."""
        from memetrace.clusterer.export import format_of, write_clusters

        out = Path(out)
        write_clusters(self._rows(), out, format or format_of(out))
        return out

    def close(self) -> None:
        """Release the data dir's files and Milvus client; the library cannot be used afterwards."""
        if self._context is not None:
            self._context.close()
            self._context, self._finder = None, None

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._context is None else f"data_dir={str(self.data_dir)!r}"
        return f"<memetrace.Library {state}>"

    def _rows(self) -> list[ClusterRow]:
        from memetrace.cli.tables import cluster_table

        return cluster_table(self.context)


def image_bytes(image: ImageLike) -> tuple[bytes, str]:
    """(encoded bytes, a label for results) of what :meth:`Library.query` accepts. Arrays and PIL
    images are encoded as PNG: the query then goes through the same decoder as every file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), f"<{len(image)} bytes>"
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes(), str(image)
    from PIL import Image

    if not isinstance(image, Image.Image):
        if not hasattr(image, "__array_interface__"):
            raise TypeError(f"query() takes a path, bytes, a numpy array or a PIL image, not {type(image).__name__}")
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise TypeError(f"query() takes uint8 arrays of H x W, H x W x 3 (RGB) or H x W x 4 (RGBA), "
                            f"not {array.dtype} {array.shape}")
        image = Image.fromarray(array)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), f"<{image.mode} image {image.width}x{image.height}>"
