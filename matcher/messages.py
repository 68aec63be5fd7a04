"""The Kafka message contract of the matcher service.

``memetrace.images`` (in)    :class:`ingest.messages.ImageEvent`, one per stored post.
``memetrace.matches`` (out)  JSON :class:`MatchEvent`, one per verified copy relation, key
                             ``"a:b"`` (a < b): the same pair always lands on the same partition,
                             and a redelivered image re-publishes identical edges (the clusterer
                             stores edges by pair, so duplicates change nothing).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from memetrace.catalog import Match


class MatchEvent(BaseModel):
    a: int = Field(description="the smaller image id")
    b: int
    score: float
    inliers: int
    kind: str = Field(description="full (same content) or partial (one holds a part of the other)")

    @classmethod
    def of(cls, m: Match) -> MatchEvent:
        return cls(a=min(m.a, m.b), b=max(m.a, m.b), score=m.score, inliers=m.inliers, kind=m.kind)

    def to_match(self) -> Match:
        return Match(self.a, self.b, self.score, self.inliers, self.kind)

    def key(self) -> bytes:
        return f"{self.a}:{self.b}".encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")
