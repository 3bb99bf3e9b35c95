"""A contour-length curriculum: which Pathfinder lengths each epoch trains on.

Why: a recurrent model learns to trace long contours more easily once it traces short ones (the
Pathfinder papers train one length at a time; curricula over length are the usual fix when long
contours do not train from scratch). The schedule is cumulative by default: later stages add
lengths, earlier ones stay, so short contours are not forgotten.

Syntax (`train --curriculum`):

- "auto": the data's lengths, shortest first, each stage adding the next length, stages of equal
  epochs (e.g. lengths 6, 9, 14 over 6 epochs: {6} for epochs 1-2, {6, 9} for 3-4, all for 5-6);
- "E:L,L;E:L,L,...": from epoch E (1-based) on, train on lengths L (e.g. "1:6,9;3:6,9,14;5:6,9,14,20");
  the first stage must start at epoch 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Curriculum:
    stages: tuple[tuple[int, tuple[int, ...]], ...]  # (first epoch, lengths), by first epoch

    def lengths(self, epoch: int) -> tuple[int, ...]:
        """Lengths trained in `epoch` (1-based)."""
        current = self.stages[0][1]
        for first, lengths in self.stages:
            if epoch >= first:
                current = lengths
        return current

    def describe(self) -> str:
        return ";".join(f"{first}:{','.join(map(str, lengths))}" for first, lengths in self.stages)


def _int(text: str, what: str, schedule: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"--curriculum {schedule!r}: {what} {text.strip()!r} is not a whole number; "
                          "write EPOCH:LENGTHS stages such as 1:6,9;3:6,9,14, or auto") from None


def parse(schedule: str, data_lengths: list[int], epochs: int) -> Curriculum:
    """The schedule checked against the lengths the training data holds (one ConfigError line each)."""
    available = sorted(set(data_lengths))
    if schedule.strip() == "auto":
        per = max(1, epochs // len(available))
        stages = tuple((1 + i * per, tuple(available[: i + 1])) for i in range(len(available)) if 1 + i * per <= epochs)
        return Curriculum(stages)
    stages = []
    for item in filter(None, (s.strip() for s in schedule.split(";"))):
        if ":" not in item:
            raise ConfigError(f"--curriculum {schedule!r}: stage {item!r} has no EPOCH:LENGTHS colon")
        first, lengths = item.split(":", 1)
        stages.append((_int(first, "epoch", schedule),
                       tuple(sorted({_int(n, "length", schedule) for n in lengths.split(",") if n.strip()}))))
    if not stages or any(not lengths for _, lengths in stages):
        raise ConfigError(f"--curriculum {schedule!r}: every stage needs at least one length")
    stages.sort()
    if stages[0][0] != 1 or len({first for first, _ in stages}) != len(stages):
        raise ConfigError(f"--curriculum {schedule!r}: the first stage must start at epoch 1, one stage per epoch")
    missing = sorted({n for _, lengths in stages for n in lengths} - set(available))
    if missing:
        raise ConfigError(f"--curriculum names length(s) {', '.join(map(str, missing))} that the training data lacks "
                          f"(it holds {', '.join(map(str, available))})")
    return Curriculum(tuple(stages))
