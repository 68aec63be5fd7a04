"""Find the verified copies of images already stored: VectorIndex candidates -> Verifier -> matches.

Used by ``memetrace index`` for the images a run added, by ``memetrace query`` for outside
images, and by the streaming matcher service for each new image event.

Every store read (vectors and candidates from the index, keypoints from the feature store) goes
through ``call``: the streaming worker passes its retry, so a failed read is repeated alone, never
the candidate searches and verifications already done; the batch pipeline calls once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import Self

import faiss
import numpy as np

from memetrace.byte_lru import ByteLRU
from memetrace.errors import Call, call_once
from memetrace.feature_store import FeatureStore
from memetrace.keypoints import Keypoints
from memetrace.matcher.low_texture import LowTextureConfig, decide, sketch_of_gray
from memetrace.matcher.overlay import gray_of_jpeg, is_overlay
from memetrace.matcher.verify import Overlay, Prepared, Verification, Verifier, VerifyConfig, geometry
from memetrace.models import Candidate, Geometry, Match
from memetrace.parallel import concurrently
from memetrace.settings import Settings
from memetrace.vector_index import VectorIndex


@dataclass(frozen=True)
class MatchConfig:
    """How many candidates to verify and how: the settings of the same names describe them."""

    candidates_k: int
    query_candidates_k: int
    candidate_min_similarity: float
    match_threads: int
    cache_bytes: int  # prepared keypoints kept (the images a viral batch verifies against again and again)
    verify: VerifyConfig
    low_texture: LowTextureConfig

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(candidates_k=s.candidates_k, query_candidates_k=s.query_candidates_k,
                   candidate_min_similarity=s.candidate_min_similarity,
                   match_threads=s.match_threads, cache_bytes=s.match_cache_mb * 2**20,
                   verify=VerifyConfig.from_settings(s),
                   low_texture=LowTextureConfig.from_settings(s))


@dataclass(frozen=True)
class Verified:
    """A candidate the verifier accepted, with both sides' prepared keypoints (for its geometry)."""

    query: Prepared
    candidate: Candidate
    prepared: Prepared
    verification: Verification


class Matcher:
    """``verifier``: default one built from ``config.verify`` (a test may hand a recording one)."""

    def __init__(self, config: MatchConfig, index: VectorIndex, features: FeatureStore,
                 verifier: Verifier | None = None) -> None:
        self.config = config
        self.index = index
        self.features = features
        self.verifier = verifier or Verifier(config.verify)
        self._prepared: ByteLRU[int, Prepared | None] = ByteLRU(config.cache_bytes, _nbytes)
        faiss.omp_set_num_threads(1)  # parallelism comes from our threads, one query each

    def prepared(self, image_id: int, call: Call = call_once) -> Prepared | None:
        """The stored keypoints of ``image_id`` ready to verify (None: none stored), read through ``call``."""
        found, p = self._prepared.get(image_id)
        if not found:
            kp = call(lambda: self.features.get_keypoints(image_id))
            p = Prepared(kp) if kp is not None else None
            self._prepared.put(image_id, p)
        return p

    def _keep(self, cands: list[Candidate]) -> list[Candidate]:
        return [c for c in cands if c.similarity >= self.config.candidate_min_similarity]

    def _verify(self, query: Prepared, cands: Sequence[Candidate], call: Call, vector: np.ndarray,
                sketch: Callable[[], np.ndarray | None], gray: Callable[[], np.ndarray | None]) -> list[Verified]:
        """The candidates verified locally, then by the low-texture rule; ``vector``: the query's
        global descriptor, ``sketch`` and ``gray``: read its thumbnail sketch and gray thumbnail when needed."""
        loaded = [(c, self.prepared(c.image_id, call)) for c in cands]
        loaded = [(c, p) for c, p in loaded if p is not None]
        lt = self.config.low_texture
        # the candidate's similarity is the best of its global and regional ones: >= the global one
        smooth = [i for i, (c, p) in enumerate(loaded) if lt.applies(query, p) and c.similarity >= lt.min_similarity]
        # the low-texture rule judges those of them local verification turns down: their global
        # vectors are read while it runs
        ids = [loaded[i][0].image_id for i in smooth]

        def verify() -> list[Verification]:
            return self.verifier.verify_many(query, [p for _, p in loaded],
                                             self._overlay(query, [(c.image_id, p) for c, p in loaded], gray, call))

        found, stored = (concurrently(verify, lambda: call(lambda: self.index.vectors(ids, with_regions=False)))
                         if ids else (verify(), None))
        done = {v.candidate for v in found}
        smooth = [i for i in smooth if i not in done]
        found += self._low_texture(query, [loaded[i] for i in smooth], smooth, stored, vector, sketch, call)
        return [Verified(query, *loaded[v.candidate], v) for v in found]

    def _low_texture(self, query: Prepared, pairs: list[tuple[Candidate, Prepared]], index: list[int],
                     stored: tuple[list[int], np.ndarray, list[np.ndarray]] | None, vector: np.ndarray,
                     sketch: Callable[[], np.ndarray | None], call: Call) -> list[Verification]:
        """Verdicts of :func:`memetrace.matcher.low_texture.decide` on ``pairs`` (``index``: their
        places in the candidate list); ``stored``: :meth:`VectorIndex.vectors` of them and maybe more."""
        if not pairs or stored is None:
            return []
        wanted = {c.image_id for c, _ in pairs}
        # their rows in the order read: the matrix a read of only them gives, so the same products
        rows = [k for k, i in enumerate(stored[0]) if i in wanted]
        similarity = dict(zip([stored[0][k] for k in rows], (stored[1][rows] @ vector).tolist()))
        q_sketch = sketch()
        verdicts = (decide(self.config.low_texture, i, similarity[c.image_id], query, q_sketch, p,
                           self.sketch(c.image_id, call)) if c.image_id in similarity else None
                    for i, (c, p) in zip(index, pairs))
        return [v for v in verdicts if v is not None]

    def _overlay(self, query: Prepared, loaded: Sequence[tuple[int, Prepared]], gray: Callable[[], np.ndarray | None],
                 call: Call) -> Overlay:
        """The thumbnails' verdict on an unmoved pair the keypoints cannot decide
        (:func:`memetrace.matcher.overlay.agreement`); ``loaded``: the candidates' (image id, keypoints)
        in verification order, ``gray``: reads the query's gray thumbnail (once, when first needed)."""
        query_gray = cache(gray)
        cand_gray = cache(partial(self.gray, call=call))  # a pair may be asked as is and mirrored

        def check(v: Verification) -> bool:
            image_id, cand = loaded[v.candidate]
            return is_overlay(query, query_gray(), cand, cand_gray(image_id), v, self.config.verify)
        return check

    def gray(self, image_id: int, call: Call = call_once) -> np.ndarray | None:
        """The stored thumbnail of ``image_id`` in gray, as the overlay check compares it (None: none stored)."""
        data = call(lambda: self.features.get_thumbnail(image_id))
        return None if data is None else gray_of_jpeg(data)

    def sketch(self, image_id: int, call: Call = call_once) -> np.ndarray | None:
        """The stored thumbnail of ``image_id`` as the low-texture rule compares it (None: none stored)."""
        gray = self.gray(image_id, call)
        return None if gray is None else sketch_of_gray(gray)

    def _geometries(self, found: Sequence[tuple[int, Verified]], sizes: dict[int, tuple[int, int]],
                    call: Call) -> list[Geometry | None]:
        """Each (query id, verified pair)'s geometry in file pixels (None: a size no longer stored);
        ``sizes``: those already known, the others are read from the index."""
        missing = {i for qid, f in found for i in (qid, f.candidate.image_id)} - sizes.keys()
        if missing:
            rows = call(lambda: self.index.get(sorted(missing)))
            sizes = {**sizes, **{i: (r.width, r.height) for i, r in rows.items()}}
        pad = self.config.verify.coverage_radius
        return [geometry(f.verification, f.query, f.prepared, sizes[qid], sizes[f.candidate.image_id], pad)
                if qid in sizes and f.candidate.image_id in sizes else None for qid, f in found]

    def _candidates_of(self, image_ids: Sequence[int], since: int | None,
                       call: Call) -> tuple[list[int], np.ndarray, list[list[Candidate]]]:
        # regions are only searched against images stored before ``since``: none, no regions needed
        with_regions = since is None or call(lambda: self.index.stored_before(since))
        ids, glob, regs = call(lambda: self.index.vectors(image_ids, with_regions=with_regions))
        return ids, glob, call(lambda: self.index.candidates_many(glob, regs, self.config.candidates_k, ids,
                                                            regions_vs_stored_before=since))

    def match_stored(self, image_ids: Sequence[int], on_progress: Callable[[int], None] = lambda n: None,
                     chunk: int = 64, all_stored_since: int | None = None, call: Call = call_once) -> list[Match]:
        """Verified matches of stored images against everything stored (each pair checked once).

        ``all_stored_since``: every image stored since that time (unix ms) is among ``image_ids``
        (a batch run), which lets candidate search skip work the other side of each pair does anyway.
        The index answers the next chunk's searches (Milvus: in its own process) while this one verifies.
        """
        done: set[tuple[int, int]] = set()
        matches: list[Match] = []
        chunks = [image_ids[i:i + chunk] for i in range(0, len(image_ids), chunk)]
        candidates_of = partial(self._candidates_of, since=all_stored_since, call=call)
        with ThreadPoolExecutor(self.config.match_threads) as pool, ThreadPoolExecutor(1) as search:
            ahead = search.submit(candidates_of, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                ids, glob, cand_lists = ahead.result()
                if k + 1 < len(chunks):
                    ahead = search.submit(candidates_of, chunks[k + 1])
                jobs = []
                for qid, vector, cands in zip(ids, glob, cand_lists):
                    todo = [c for c in self._keep(cands) if (min(qid, c.image_id), max(qid, c.image_id)) not in done]
                    done.update((min(qid, c.image_id), max(qid, c.image_id)) for c in todo)
                    query = self.prepared(qid, call) if todo else None
                    if query is not None:
                        jobs.append((qid, pool.submit(self._verify, query, todo, call, vector,
                                                      partial(self.sketch, qid, call), partial(self.gray, qid, call))))
                found = [(qid, f) for qid, fut in jobs for f in fut.result()]
                for (qid, f), geo in zip(found, self._geometries(found, {}, call)):
                    cid, v = f.candidate.image_id, f.verification
                    oriented = geo if geo is None or qid < cid else geo.swapped()
                    matches.append(Match(min(qid, cid), max(qid, cid), v.inliers, v.kind, oriented))
                on_progress(len(ids))
        return matches

    def verify_pairs(self, pairs: Sequence[tuple[int, int]], sizes: Mapping[int, tuple[int, int]] = {},
                     call: Call = call_once) -> list[Match]:
        """The pairs (a, b) of stored images that verify locally (with the overlay check, no
        low-texture rule), ``a`` as the query whatever order they were met in, geometry a -> b; ``sizes``: file sizes already known
        (the others are read from the index). Derivation trees verify pairs the candidates missed."""
        others: dict[int, list[int]] = {}
        for a, b in pairs:
            others.setdefault(a, []).append(b)
        found: list[tuple[int, Verified]] = []
        for a, bs in others.items():
            query = self.prepared(a, call)
            loaded = [(b, p) for b in bs if (p := self.prepared(b, call)) is not None] if query else []
            if not loaded:
                continue
            overlay = self._overlay(query, loaded, partial(self.gray, a, call), call)
            for v in self.verifier.verify_many(query, [p for _, p in loaded], overlay):
                b, p = loaded[v.candidate]
                # not from a search: no similarity (only the id and the verification are read)
                found.append((a, Verified(query, Candidate(b, float("nan")), p, v)))
        return [Match(a, f.candidate.image_id, f.verification.inliers, f.verification.kind, geo)
                for (a, f), geo in zip(found, self._geometries(found, dict(sizes), call))]

    def match_outside(self, vector: np.ndarray, regions: np.ndarray, keypoints: Keypoints, size: tuple[int, int],
                      exclude: int = -1, call: Call = call_once,
                      sketch: Callable[[], np.ndarray | None] = lambda: None,
                      gray: Callable[[], np.ndarray | None] = lambda: None) -> list[tuple[Verified, Geometry | None]]:
        """Verified copies of an image that need not be stored (``memetrace query``, the API), with
        their geometry (query -> copy); ``size``: the query file's width and height; ``sketch``: reads
        its :func:`~memetrace.matcher.low_texture.sketch_of_rgb`, only when the low-texture rule is
        tried (a None: no low-texture rule); ``gray``: reads its gray thumbnail
        (:func:`~memetrace.matcher.overlay.gray_of_rgb`), only when the overlay check needs it (a None:
        no overlay check)."""
        # one query, not a batch: no search from the other side finds the pair, so it verifies more
        # candidates (20 instead of 8: about +45 % p50 latency, docs/benchmarks.md)
        k = self.config.query_candidates_k
        cands = self._keep(call(lambda: self.index.candidates(vector, regions, k, exclude)))
        if not cands:
            return []
        # the candidates' sizes (for the geometries of those verified) are read while they are verified
        verified, records = concurrently(lambda: self._verify(Prepared(keypoints), cands, call, vector, sketch, gray),
                                         lambda: call(lambda: self.index.get([c.image_id for c in cands])))
        found = [(exclude, f) for f in verified]
        sizes = {exclude: size, **{i: (r.width, r.height) for i, r in records.items()}}
        return [(f, geo) for (_, f), geo in zip(found, self._geometries(found, sizes, call))]


def _nbytes(p: Prepared | None) -> int:
    return 0 if p is None else p.nbytes
