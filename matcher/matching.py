"""Find the verified copies of images already stored: VectorIndex candidates -> Verifier -> matches.

Used by ``memetrace index`` for the images a run added, by ``memetrace query`` for outside
images, and by the streaming matcher service for each new image event.

Every store read (vectors and candidates from the index, keypoints from the feature store) goes
through ``call``: the streaming worker passes its retry, so a failed read is repeated alone, never
the candidate searches and verifications already done; the batch pipeline calls once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Self

import faiss
import numpy as np

from memetrace.errors import Call, call_once
from memetrace.feature_store import FeatureStore
from memetrace.keypoints import Keypoints
from memetrace.matcher.verify import Prepared, Verifier, VerifyConfig
from memetrace.models import Candidate, Match
from memetrace.settings import Settings
from memetrace.vector_index import VectorIndex

CACHED = 4096  # prepared keypoints kept: the images a viral batch verifies against again and again


@dataclass(frozen=True)
class MatchConfig:
    """How many candidates to verify and how: the settings of the same names describe them."""

    candidates_k: int
    candidate_min_similarity: float
    match_threads: int
    verify: VerifyConfig

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(candidates_k=s.candidates_k, candidate_min_similarity=s.candidate_min_similarity,
                   match_threads=s.match_threads, verify=VerifyConfig.from_settings(s))


class Matcher:
    """``verifier``: default one built from ``config.verify`` (a test may hand a recording one)."""

    def __init__(self, config: MatchConfig, index: VectorIndex, features: FeatureStore,
                 verifier: Verifier | None = None) -> None:
        self.config = config
        self.index = index
        self.features = features
        self.verifier = verifier or Verifier(config.verify)
        self._prepared: OrderedDict[int, Prepared | None] = OrderedDict()  # the latest CACHED, by use
        self._cache_lock = threading.Lock()
        faiss.omp_set_num_threads(1)  # parallelism comes from our threads, one query each

    def prepared(self, image_id: int, call: Call = call_once) -> Prepared | None:
        """The stored keypoints of ``image_id`` ready to verify (None: none stored), read through ``call``."""
        with self._cache_lock:
            if image_id in self._prepared:
                self._prepared.move_to_end(image_id)
                return self._prepared[image_id]
        kp = call(lambda: self.features.get_keypoints(image_id))
        p = Prepared(kp) if kp is not None else None
        with self._cache_lock:
            self._prepared[image_id] = p
            if len(self._prepared) > CACHED:
                self._prepared.popitem(last=False)
        return p

    def _keep(self, cands: list[Candidate]) -> list[Candidate]:
        return [c for c in cands if c.similarity >= self.config.candidate_min_similarity]

    def _verify(self, query: Prepared, cands: Sequence[Candidate], call: Call) -> list[tuple[Candidate, object]]:
        loaded = [(c, self.prepared(c.image_id, call)) for c in cands]
        loaded = [(c, p) for c, p in loaded if p is not None]
        found = self.verifier.verify_many(query, [p for _, p in loaded])
        return [(loaded[v.candidate][0], v) for v in found]

    def _candidates_of(self, image_ids: Sequence[int], since: int | None,
                       call: Call) -> tuple[list[int], list[list[Candidate]]]:
        # regions are only searched against images stored before ``since``: none, no regions needed
        with_regions = since is None or call(lambda: self.index.stored_before(since))
        ids, glob, regs = call(lambda: self.index.vectors(image_ids, with_regions=with_regions))
        return ids, call(lambda: self.index.candidates_many(glob, regs, self.config.candidates_k, ids,
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
                ids, cand_lists = ahead.result()
                if k + 1 < len(chunks):
                    ahead = search.submit(candidates_of, chunks[k + 1])
                jobs = []
                for qid, cands in zip(ids, cand_lists):
                    todo = [c for c in self._keep(cands) if (min(qid, c.image_id), max(qid, c.image_id)) not in done]
                    done.update((min(qid, c.image_id), max(qid, c.image_id)) for c in todo)
                    query = self.prepared(qid, call) if todo else None
                    if query is not None:
                        jobs.append((qid, pool.submit(self._verify, query, todo, call)))
                for qid, fut in jobs:
                    for cand, v in fut.result():
                        matches.append(Match(min(qid, cand.image_id), max(qid, cand.image_id), v.inliers, v.kind))
                on_progress(len(ids))
        return matches

    def match_outside(self, vector: np.ndarray, regions: np.ndarray, keypoints: Keypoints,
                      exclude: int = -1, call: Call = call_once) -> list[tuple[Candidate, object]]:
        """Verified copies of an image that need not be stored (``memetrace query``, the API)."""
        cands = self._keep(call(lambda: self.index.candidates(vector, regions, self.config.candidates_k, exclude)))
        return self._verify(Prepared(keypoints), cands, call)
