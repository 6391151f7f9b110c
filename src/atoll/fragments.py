"""Streaming DiLoCo's fragments: which part of the model an outer step averages, and when.

`diloco.fragments` = P splits the model into P fragments of consecutive transformer blocks, the
embeddings joining the first and the final norm and head the last (Douillard et al. 2025,
"Streaming DiLoCo with overlapping communication", arXiv:2501.18512, whose "strided" pattern
this is not: consecutive blocks keep each fragment one contiguous span of DiLoCo's flat buffers,
so the ring, the digest and the outer update each run over one slice). Every fragment is averaged
every H inner steps, the fragments staggered by H/P: an outer step is due every H/P inner steps,
and the one after inner step k·H/P averages fragment (k − 1) mod P, so the link carries a 1/P
slice of the model at a time. The last outer step of a run (train.steps) averages every fragment
at once, so that every island ends with the same weights.

Everything here is a pure function of the names and sizes of the parameters, or of the step: the
islands agree on the fragment of every outer step without a word, and a resumed or joining island
derives it from the step it is at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate, pairwise

_BLOCK = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class Fragment:
    """One fragment: its parameters (indices into the parameter list) and their span of the flat buffer."""

    params: range
    span: slice


def split_fragments(names: list[str], sizes: list[int], count: int) -> list[Fragment]:
    """`count` fragments of consecutive transformer blocks ("layers.<i>." parameters), as even as
    the blocks allow (the first ones take the remainder); parameters before the first block join
    the first fragment, those after the last block the last one. `names` and `sizes` are in the
    flat buffer's order, where the blocks are contiguous and in order.

    Raises ValueError when there are fewer blocks than fragments.
    """
    blocks = [int(m.group(1)) if (m := _BLOCK.match(name)) else None for name in names]
    numbers = sorted({b for b in blocks if b is not None})
    if count > max(1, len(numbers)):
        raise ValueError(f"diloco.fragments ({count}) is more than the model's {len(numbers)} transformer blocks: use at most {len(numbers)}")
    per, extra = divmod(len(numbers), count)
    firsts = [sum(per + (k < extra) for k in range(f)) for f in range(1, count)]  # each later fragment's first block
    bounds = [0, *(blocks.index(numbers[b]) for b in firsts), len(names)]  # parameter indices where fragments begin
    offsets = [0, *accumulate(sizes)]
    return [Fragment(range(a, b), slice(offsets[a], offsets[b])) for a, b in pairwise(bounds)]


def period(inner_steps: int, count: int) -> int:
    """Inner steps between outer steps: H/P."""
    return inner_steps // count


def fragment_at(step: int, is_last: bool, inner_steps: int, count: int) -> int | None:
    """The fragment averaged by the outer step after inner step `step` (on the H/P grid), or None
    for every fragment: one fragment (P = 1), or the run's last step."""
    if count == 1 or is_last:
        return None
    return (step // period(inner_steps, count) - 1) % count


def last_averaged(step: int, fragment: int, inner_steps: int, count: int) -> int:
    """The inner step after which `fragment` was last averaged before `step` (0: never, the run's
    start): where the inner phase that the outer step at `step` closes for it began. For P = 1
    the last multiple of H before `step`."""
    offset = (fragment + 1) * period(inner_steps, count) % inner_steps  # fragment f is averaged at steps = offset (mod H)
    last = (step - 1 - offset) // inner_steps * inner_steps + offset
    return max(0, last)
