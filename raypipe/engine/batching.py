"""Length-sorted batch planning shared by generation and prefill: fewest padded tokens."""

from __future__ import annotations

# A prefill batch costs one forward with nothing fixed per batch worth saving, so it is cut
# tightly: with 0.1 instead of 0.25 the projector took 0.84 of the time on the same prompts
# (embedded model, CPU; 12.5% -> 4.2% padded tokens). Generation passes a looser limit.
PREFILL_MAX_PADDING = 0.1


def plan_batches(
    lengths: list[int],
    max_batch_tokens: int,
    max_batch_size: int = 1 << 30,
    extra: int = 0,
    sort: bool = True,
    max_padding: float = PREFILL_MAX_PADDING,
) -> list[list[int]]:
    """Index batches, longest first, each within `max_batch_tokens` padded tokens (length +
    `extra` new tokens per row) and `max_batch_size` rows, and cut where a row would be padded
    by more than `max_padding` of the batch width, so short sequences never ride with long."""
    order = list(range(len(lengths)))
    if sort:
        order.sort(key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        need = lengths[i] + extra
        if cur:
            over_budget = max(width, need) * (len(cur) + 1) > max_batch_tokens
            ragged = sort and need < (1 - max_padding) * width
            if len(cur) >= max_batch_size or over_budget or ragged:
                batches.append(cur)
                cur, width = [], 0
        cur.append(i)
        width = max(width, need)
    if cur:
        batches.append(cur)
    return batches
