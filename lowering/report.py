"""What a lowering run did: one record per rewrite and per node left to Inductor."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Rewrite:
    pattern: str  # e.g. "linear", "addmm", "sdpa", "eager_attention", "repeat_kv"
    node: str
    layer: int | None


@dataclass(slots=True)
class Skipped:
    what: str  # "attention" or "gemm"
    node: str
    reason: str
    layer: int | None


@dataclass(slots=True)
class LoweringReport:
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def rewrote(self, pattern: str, node, layer: int | None) -> None:
        self.rewrites.append(Rewrite(pattern, str(node), layer))

    def skip(self, what: str, node, reason: str, layer: int | None) -> None:
        self.skipped.append(Skipped(what, str(node), reason, layer))

    @property
    def counters(self) -> Counter:
        return Counter(r.pattern for r in self.rewrites)

    def count(self, *patterns: str) -> int:
        c = self.counters
        return sum(c[p] for p in patterns)

    def merge(self, other: "LoweringReport") -> None:
        self.rewrites.extend(other.rewrites)
        self.skipped.extend(other.skipped)
