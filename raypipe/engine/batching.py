"""Length-sorted batch planning shared by generation and prefill: the fewest padded tokens for
the forward passes they take."""

from __future__ import annotations

# What one more forward pass costs beyond its tokens, counted in padded tokens, has two parts.
# 1. Its fixed work per layer (the layer's Python, kernel launches, small matrices running
#    below peak), in FLOPs, against one token's 2 FLOPs per weight of the layer: large for
#    small models. CPU: fitted here, where cutting 64 prompts of the 4-layer test model (41k
#    weights a layer) into 2 prefills instead of 10 took 0.73 of the time: about 10 MFLOP,
#    ~120 tokens for that model, ~1 for the 135M embedded one. CUDA: an estimate, not
#    measured here: about 0.1 ms of launches a layer at 550 TFLOP/s (an H100's 34.6k tok/s
#    of an 8B prefill), ~115 tokens of an 8B model.
# 2. Reading the weights once more: a pass is memory-bound below FLOPS / (2 x bandwidth)
#    tokens per byte of weight. CPU about 3 (2 AVX2 cores at ~100 GFLOP/s, ~15 GB/s), so ~13
#    tokens in fp32, and the embedded model kept the tight cuts it ran fastest in (0.84 of
#    the time at 4% padding than at 12%); an H100 about 150, ~300 tokens in bf16.
LAYER_OVERHEAD_FLOPS = {"cpu": 10e6, "cuda": 50e9}
TOKENS_PER_WEIGHT_BYTE = {"cpu": 3.3, "cuda": 150.0}
DEFAULT_OVERHEAD_TOKENS = 16  # a device or config the rule above cannot size


def overhead_tokens(config, device_type: str, weight_bytes: float = 4.0) -> int:
    """Padded tokens one more forward pass of this decoder (an HF config) is worth on this
    kind of device, its weights `weight_bytes` each (4 fp32, 2 bf16, 0.5 4-bit)."""
    cfg = getattr(config, "text_config", None) or config
    d = getattr(cfg, "hidden_size", None)
    flops = LAYER_OVERHEAD_FLOPS.get(device_type)
    if not isinstance(d, int) or d < 1 or flops is None:
        return DEFAULT_OVERHEAD_TOKENS
    heads = getattr(cfg, "num_attention_heads", None) or 1
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    ffn = getattr(cfg, "intermediate_size", None) or 4 * d
    weights = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ffn
    fixed = flops / (2 * weights)
    return max(0, round(fixed + TOKENS_PER_WEIGHT_BYTE[device_type] * weight_bytes))


def weight_bytes(model) -> float:
    """Bytes per weight of a loaded model: 0.5 where bitsandbytes packs two 4-bit weights a
    byte, else the size of its floating parameters' type."""
    import torch

    size = None
    for p in model.parameters():
        if p.dtype == torch.uint8:
            return 0.5
        if size is None and p.dtype.is_floating_point:
            size = float(p.element_size())
    return size or 4.0


def plan_batches(
    lengths: list[int],
    max_batch_tokens: int,
    max_batch_size: int = 1 << 30,
    extra: int = 0,
    sort: bool = True,
    max_padding: float = 1.0,
    overhead_tokens: int = DEFAULT_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Index batches, longest first, each within `max_batch_tokens` padded tokens (length +
    `extra` new tokens per row) and `max_batch_size` rows, cut where they cost least: padded
    tokens plus `overhead_tokens` per batch, with no row padded by more than `max_padding` of
    its batch's width. Unsorted (`sort=False`), the rows keep their order and a batch is cut
    only where it is full."""
    order = list(range(len(lengths)))
    if not sort:
        return _in_order(order, lengths, max_batch_tokens, max_batch_size, extra)
    order.sort(key=lambda i: -lengths[i])
    need = [lengths[i] + extra for i in order]
    n = len(need)
    # best[j]: the least cost of the first j rows (longest first) in whole batches; cut[j]:
    # where its last batch starts. A batch [i, j) is `need[i]` wide (its longest row).
    inf = float("inf")
    best = [0.0] + [inf] * n
    count = [0] * (n + 1)  # batches of best[j]: of equal costs, the fewer batches
    cut = [0] * (n + 1)
    for i in range(n):
        if best[i] == inf:
            continue
        width = need[i]
        rows = min(max_batch_size, max(1, max_batch_tokens // max(width, 1)), n - i)
        shortest = (1 - max_padding) * width
        for j in range(i + 1, i + rows + 1):
            if j - 1 > i and need[j - 1] < shortest:
                break  # rows only get shorter from here
            cost = best[i] + overhead_tokens + width * (j - i)
            if cost < best[j] or (cost == best[j] and count[i] + 1 < count[j]):
                best[j], count[j], cut[j] = cost, count[i] + 1, i
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


def _in_order(
    order: list[int], lengths: list[int], max_batch_tokens: int, max_batch_size: int, extra: int
) -> list[list[int]]:
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        need = lengths[i] + extra
        if cur and (
            len(cur) >= max_batch_size or max(width, need) * (len(cur) + 1) > max_batch_tokens
        ):
            batches.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, need)
    if cur:
        batches.append(cur)
    return batches
