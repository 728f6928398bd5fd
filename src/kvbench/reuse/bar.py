"""The quality bar chunk reuse is held to, against no reuse on the same prompts (issue 15's targets).

Prefix hits are exact and always pass; chunk hits reuse K/V computed after other context, so their
output can drift. A workload passes when teacher-forced top-1 agreement over no reuse's greedy output
is at least `top1_agreement` and task accuracy is at most `accuracy_drop` below no reuse's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QualityBar:
    top1_agreement: float = 0.95
    accuracy_drop: float = 0.02  # a fraction: 0.02 = 2 points

    def shortfalls(self, top1: float | None, accuracy: float | None = None,
                   reference_accuracy: float | None = None) -> tuple[str, ...]:
        """What falls below the bar, one phrase each (empty: it passes; None values are not judged)."""
        out = []
        if top1 is not None and top1 < self.top1_agreement:
            out.append(f"teacher-forced top-1 agreement {top1:.3f} < {self.top1_agreement}")
        if accuracy is not None and reference_accuracy is not None and reference_accuracy - accuracy > self.accuracy_drop + 1e-9:
            out.append(f"task accuracy {accuracy:.2f} against {reference_accuracy:.2f} without reuse "
                       f"(more than {self.accuracy_drop * 100:.0f} points lower)")
        return tuple(out)


BAR = QualityBar()
