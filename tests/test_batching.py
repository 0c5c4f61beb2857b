"""Batch planning (engine/batching.py): the cheapest cut of length-sorted rows, within budget."""

from __future__ import annotations

import itertools
import random

import pytest

from raypipe.engine.batching import plan_batches


def _cost(batches, lengths, extra, overhead):
    return sum(overhead + max(lengths[i] + extra for i in b) * len(b) for b in batches)


def _valid(batches, lengths, budget, size, extra, max_padding):
    for b in batches:
        width = max(lengths[i] + extra for i in b)
        if len(b) > size or (len(b) > 1 and width * len(b) > budget):
            return False
        if any(lengths[i] + extra < (1 - max_padding) * width for i in b):
            return False
    return True


def _brute(lengths, budget, size, extra, max_padding, overhead):
    """The least cost over every cut of the longest-first order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for mask in itertools.product((0, 1), repeat=len(order) - 1):
        batches, cur = [], [order[0]]
        for cut, i in zip(mask, order[1:]):
            if cut:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        if _valid(batches, lengths, budget, size, extra, max_padding):
            c = _cost(batches, lengths, extra, overhead)
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_plan_is_the_cheapest_valid_cut(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    lengths = [rng.randint(1, 60) for _ in range(n)]
    budget = rng.choice([40, 100, 300, 10_000])
    size = rng.choice([1, 3, 64])
    extra = rng.choice([0, 4])
    max_padding = rng.choice([0.1, 0.65, 1.0])
    overhead = rng.choice([0, 16, 256, 5000])
    got = plan_batches(lengths, budget, size, extra, True, max_padding, overhead)
    assert sorted(i for b in got for i in b) == list(range(n))
    assert [i for b in got for i in b] == sorted(range(n), key=lambda i: -lengths[i])
    assert _valid(got, lengths, budget, size, extra, max_padding)
    assert _cost(got, lengths, extra, overhead) == _brute(
        lengths, budget, size, extra, max_padding, overhead
    )


def test_overhead_trades_padding_for_fewer_passes():
    lengths = [40, 40, 30, 30, 20, 20, 10, 10]
    # no cost per pass: no padding at all, and of equal costs the fewer passes
    assert plan_batches(lengths, 10_000, overhead_tokens=0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_batches(lengths, 10_000, overhead_tokens=10_000) == [list(range(8))]
    # a row longer than the budget still gets a batch of its own
    assert plan_batches([500, 3, 2], 100) == [[0], [1, 2]]


def test_unsorted_keeps_the_order_and_cuts_only_when_full():
    lengths = [5, 50, 5, 5, 50]
    assert plan_batches(lengths, 120, sort=False) == [[0, 1], [2, 3], [4]]
    assert plan_batches(lengths, 10_000, max_batch_size=2, sort=False) == [[0, 1], [2, 3], [4]]


def _greedy(lengths, budget, size, extra, max_padding):
    """Longest first, each batch filled until a row would not fit (the fewest batches)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, width = [], [], 0
    for i in order:
        need = lengths[i] + extra
        full = len(cur) >= size or max(width, need) * (len(cur) + 1) > budget
        if cur and (full or need < (1 - max_padding) * width):
            batches.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, need)
    return batches + [cur]


@pytest.mark.parametrize("seed", range(20))
def test_generation_takes_the_fewest_batches(seed):
    """Generation's plan (a batch worth more than any padding): as few batches as filling
    each one in turn gives, and of those the fewest padded tokens."""
    from types import SimpleNamespace

    from raypipe.engine.generate import GenerationOptions, Generator

    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 80), rng.randint(300, 700)]) for _ in range(48)]
    o = GenerationOptions(
        max_new_tokens=32, max_batch_tokens=rng.choice([4096, 16384]), max_batch_size=16
    )
    got = Generator(None, SimpleNamespace(pad_token_id=0, eos_token_id=2), o).plan(lengths)
    want = _greedy(lengths, o.max_batch_tokens, o.max_batch_size, 32, o.max_padding)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert len(got) == len(want)
    assert _cost(got, lengths, 32, 0) <= _cost(want, lengths, 32, 0)
