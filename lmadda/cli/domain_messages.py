"""What the command line tells a user about the domain check (lmadda predict's warnings, diagnose's refusal)."""

from __future__ import annotations

import sys

from lmadda.domain import DomainScore


def missing_reference_message(where: str) -> str:
    return (f"{where} carries no domain reference (it was written before lmadda stored one), so images cannot be checked "
            f"against its training domain; add one with `lmadda diagnose --add-reference {where} --manifest MANIFEST` "
            "(the manifest of the images it was trained or adapted on)")


def warn_about(score: DomainScore | None, image: object, checkpoint: object) -> None:
    """What `lmadda predict` tells a user about the domain check: a warning on stderr unless the image is in domain."""
    if score is None:
        print(f"note: {missing_reference_message(str(checkpoint))}", file=sys.stderr)
    elif score.verdict == "out_of_domain":
        print(f"warning: {image} is OUT OF DOMAIN for {checkpoint} (domain score {score.score:.2f}, out of domain above "
              f"{score.thresholds[1]:.2f}): do not trust this stain; `lmadda diagnose {checkpoint} FOLDER` says what to do", file=sys.stderr)
    elif score.verdict == "borderline":
        print(f"warning: {image} is borderline for {checkpoint} (domain score {score.score:.2f}, in domain up to "
              f"{score.thresholds[0]:.2f}); check this stain before relying on it", file=sys.stderr)
