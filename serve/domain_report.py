"""What the endpoint tells its clients about the domain check: per response, headers an acquisition PC reads to
flag an image; per served model, the tally `GET /v1/models` shows, so drift of a setting is seen at a glance."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmadda.domain import VERDICTS, DomainScore


def domain_headers(*scores: DomainScore | None) -> dict[str, str]:
    """The HTTP headers an acquisition PC reads to flag an image: the least trustworthy of `scores` (an image stained
    by several models is as trustworthy as its worst); 'unknown' when no model had a domain reference."""
    known = [score for score in scores if score is not None]
    if not known:
        return {"X-Lmadda-Domain-Score": "nan", "X-Lmadda-Domain-Verdict": "unknown"}
    worst = max(known, key=lambda score: (VERDICTS.index(score.verdict), score.score))
    return {"X-Lmadda-Domain-Score": f"{worst.score:.3f}", "X-Lmadda-Domain-Verdict": worst.verdict}


@dataclass
class DomainTally:
    """How the images one model stained scored, for the endpoint's GET /v1/models: an acquisition PC or an
    operator sees at a glance that a setting's images have drifted out of domain."""

    counts: dict[str, int] = field(default_factory=lambda: {verdict: 0 for verdict in (*VERDICTS, "unknown")})
    score_sum: float = 0.0

    def add(self, score: DomainScore | None) -> None:
        self.counts["unknown" if score is None else score.verdict] += 1
        self.score_sum += 0.0 if score is None else score.score

    def as_dict(self) -> dict:
        scored = sum(self.counts[verdict] for verdict in VERDICTS)
        return {"images": sum(self.counts.values()), **self.counts,
                "out_of_domain_fraction": round(self.counts["out_of_domain"] / scored, 4) if scored else None,
                "mean_score": round(self.score_sum / scored, 4) if scored else None}
