"""The leakage ledger: which test slides an encoder saw, unlabelled, in pretraining.

A checkpoint's ``pretraining_slides`` (written by :mod:`clusiam.train`) holds the names of
the slides its weights were trained on and a digest of their patches; the evaluations
(``evaluate_knn.py``, ``mil.train``) count the test slides among them in every report, and
``--refuse_seen`` makes a seen slide, or a count that cannot be known, an error.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from clusiam.errors import DataError

BEFORE_LEDGER = "checkpoint made before the ledger"  # why an older checkpoint's count is unknown
SEEN_LABEL = "test slides seen in pretraining"  # the words of every report's ledger line


def pretraining_slides(state: dict[str, Any]) -> list[str] | None:
    """The names of the slides a checkpoint was pretrained on, from its ledger; None for a
    checkpoint made before checkpoints kept one (not an empty list: nothing is known)."""
    ledger = state.get("pretraining_slides")
    return None if ledger is None else list(ledger["names"])


@dataclass(frozen=True)
class SeenInPretraining:
    """The leakage ledger's answer for one encoder and one test set: which test slides the
    encoder saw (unlabelled) in pretraining. ``seen`` is None when that is not known, with
    ``unknown`` saying why; a baseline (no ``checkpoint``, nothing pretrained) has neither."""

    checkpoint: str | None
    total: int  # test slides
    seen: list[str] | None = None
    unknown: str | None = None

    @classmethod
    def count(cls, checkpoint: str | None, pretrained_on: Sequence[str] | None,
              test_slides: Iterable[str]) -> SeenInPretraining:
        """Match the test slides by name against a checkpoint's ledger (``pretrained_on``, see
        :func:`pretraining_slides`); no checkpoint is a baseline."""
        test = set(test_slides)
        if checkpoint is None:
            return cls(None, len(test))
        if pretrained_on is None:
            return cls(checkpoint, len(test), unknown=BEFORE_LEDGER)
        return cls(checkpoint, len(test), seen=sorted(test & set(pretrained_on)))

    def text(self) -> str:
        """``3 of 40``; ``unknown (why)``; ``-`` for a baseline."""
        if self.seen is not None:
            return f"{len(self.seen)} of {self.total}"
        return f"unknown ({self.unknown})" if self.unknown else "-"

    def line(self) -> str:
        return f"{SEEN_LABEL}: {self.text()}"

    def as_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "seen": None if self.seen is None else len(self.seen),
                "of": self.total, "slides": self.seen, "text": self.text()}

    def refuse(self) -> None:
        """``--refuse_seen``: a test slide seen in pretraining is an error, and so is a count
        that is not known (the guarantee asked for cannot be given)."""
        if self.seen:
            raise DataError(f"--refuse_seen: {len(self.seen)} of the {self.total} test slides were seen in "
                            f"pretraining by {self.checkpoint}, e.g. {self.seen[0]}: evaluate on slides it was not "
                            "pretrained on, pretrain without the test slides, or drop --refuse_seen")
        if self.seen is None and self.unknown:
            raise DataError(f"--refuse_seen: whether {self.checkpoint or 'the encoder'} saw the test slides in "
                            f"pretraining is unknown ({self.unknown}): use a checkpoint whose ledger can be read (any "
                            "that pretrain.py writes now), or drop --refuse_seen")
