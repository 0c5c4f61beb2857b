"""GPU correctness check: projector scores on CUDA equal output_hidden_states . v^ (fp32 and
bf16, eager and with --compile-prefill), with early stop, on a random Llama; run before the GPU
benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypipe.engine.projector import Projector  # noqa: E402


def check(dtype, tol, compile: bool = False) -> float:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    seqs = [torch.randint(3, 1000, (n,)).tolist() for n in (7, 50, 23, 130, 1)]
    vecs = [(layer, torch.randn(256)) for layer in (0, 2, 3, 3)]
    out = Projector(model, vecs, compile=compile).project(seqs)
    worst = 0.0
    for s, res in zip(seqs, out):
        with torch.no_grad():
            hs = model(torch.tensor([s], device="cuda"), output_hidden_states=True).hidden_states
        for row, (layer, v) in enumerate(vecs):
            ref = hs[layer + 1][0].float().cpu() @ (v / v.norm())
            err = (torch.from_numpy(res.scores[row]) - ref).abs().max().item()
            scale = ref.abs().max().item() + 1e-6
            worst = max(worst, err / scale)
    assert worst < tol, f"{dtype} compile={compile}: relative error {worst:.2e} >= {tol}"
    return worst


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print("gpu:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    print(f"fp32 max relative error {check(torch.float32, 1e-4):.2e}")
    # bf16: batched vs single-sequence kernels round differently; a few bf16 ulps.
    print(f"bf16 max relative error {check(torch.bfloat16, 5e-2):.2e}")
    # --compile-prefill (Triton kernels on CUDA); reported, not fatal: it is opt-in.
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        try:
            print(f"compiled {dtype} max relative error {check(dtype, tol, compile=True):.2e}")
        except Exception as e:
            print(f"compiled {dtype} FAILED: {type(e).__name__}: {e}")
    print("GPU_CHECK_OK")
