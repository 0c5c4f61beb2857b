"""Trait-vector math: mean_diff and logistic-probe directions, baselines, validation stats."""

from __future__ import annotations

import numpy as np
import torch


def mean_diff(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:  # (N, D), (M, D) -> (D,)
    return (pos.mean(0) - neg.mean(0)).astype(np.float32)


def probe(pos: np.ndarray, neg: np.ndarray, l2: float = 1e-2, steps: int = 200) -> np.ndarray:
    """L2-regularised logistic regression on standardised features, mapped back to h-space."""
    x = torch.tensor(np.concatenate([pos, neg]), dtype=torch.float64)  # (N, D)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # w . (x - mu) / sd  ==  (w / sd) . x + const: the direction in hidden-state space.
    return (w.detach() / sd).float().numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def baseline(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Projection of the midpoint of the two class centroids onto v^, in fp32 (SPEC 2)."""
    mid = (pos.astype(np.float32).mean(0) + neg.astype(np.float32).mean(0)) / 2
    return float(mid @ unit(v).astype(np.float32))


def _acc(sp: np.ndarray, sn: np.ndarray, threshold: float) -> float:
    return float(((sp > threshold).sum() + (sn <= threshold).sum()) / (len(sp) + len(sn)))


def cohens_d(sp: np.ndarray, sn: np.ndarray) -> float:
    pooled = np.sqrt((sp.var(ddof=1) + sn.var(ddof=1)) / 2) if len(sp) > 1 and len(sn) > 1 else 0
    return float((sp.mean() - sn.mean()) / pooled) if pooled > 0 else 0.0


def evaluate(
    v: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
) -> dict:
    u = unit(v)
    b = baseline(v, *train)
    tp, tn = train[0] @ u, train[1] @ u
    vp, vn = val[0] @ u, val[1] @ u
    return {
        "norm": float(np.linalg.norm(v)),
        "baseline": b,
        "train_acc": _acc(tp, tn, b),
        "val_acc": _acc(vp, vn, b),
        "val_effect_size": cohens_d(vp, vn),
    }
