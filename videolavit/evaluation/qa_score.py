"""Exact-match scoring of short answers (held-out QA): one normalisation for stage 3's validation, ``chat
--qa-file`` and the demo, so the three report the same accuracy for the same answers.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: ``" Circle."`` -> ``"circle"``."""
    return " ".join(_PUNCTUATION.sub(" ", str(text).lower()).split())


def is_one_word(answer: str) -> bool:
    return len(normalize_answer(answer).split()) == 1


@dataclass
class QAScore:
    """Exact-match accuracy of predicted answers (after ``normalize_answer``), overall and per attribute."""

    correct: int = 0
    total: int = 0
    per_attribute: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def update(self, prediction: str, answer: str, attribute: str | None = None) -> bool:
        hit = normalize_answer(prediction) == normalize_answer(answer)
        self.correct += hit
        self.total += 1
        if attribute:
            counts = self.per_attribute[attribute]
            counts[0] += hit
            counts[1] += 1
        return hit

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def attribute_accuracy(self) -> dict[str, float]:
        return {name: hits / count for name, (hits, count) in sorted(self.per_attribute.items()) if count}

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "per_attribute": {name: {"accuracy": hits / count, "correct": hits, "total": count}
                                  for name, (hits, count) in sorted(self.per_attribute.items()) if count}}
