"""Capture cost, side by side: raypipe's capture (hooked layers only, model dtype, early stop,
one .pt per prompt) vs (b) output_hidden_states to the host, saving the same layers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from common import Elsewhere, Rounds, emit, load, parser, token_batches

from raypipe.engine.capture import Capturer
from raypipe.engine.hooks import decoder_stack, pad_right
from raypipe.store.atomic import write_tensor
from raypipe.store.captures import build_capture, write_capture


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def arguments():
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=60)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run the common way in this process too (with raypipe's allocator settings)",
    )
    args = p.parse_args()
    # The allocator settings only touch host memory; on a GPU a second copy of the model would
    # only cost device memory.
    args.same_process = args.same_process or args.device != "cpu"
    return args


def prepare(args) -> SimpleNamespace:
    """The model, prompts, hooked layers and batches: built alike in both processes."""
    model, pad = load(args)
    stack = decoder_stack(model)
    n_layers, vocab = len(stack.layers), stack.embed_tokens.weight.shape[0]
    layers = [n_layers // 2, min(n_layers // 2 + 5, n_layers - 1)]
    seqs = token_batches(args.prompts, args.min_len, args.max_len, vocab)
    capturer = Capturer(model, layers, "residual", args.batch_tokens, pad)
    batches = [[seqs[i] for i in b] for b in capturer_batches(capturer, seqs)]
    return SimpleNamespace(**locals())


def common_way(args, s: SimpleNamespace | None = None) -> dict:
    """(b): output_hidden_states, every layer to the host in fp32, the hooked ones saved."""
    s = s or prepare(args)
    out = Path(args.hs_dir)

    @torch.inference_mode()
    def hidden_states(i: int):
        b = s.batches[i]
        ids, mask = pad_right(b, s.pad, s.stack.embed_tokens.weight.device)
        hs = s.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        host = [h.float().cpu() for h in hs]  # the common way: everything to the host, fp32
        for row, seq in enumerate(b):
            write_tensor(
                out / f"{i}-{row}.pt",
                {lay: host[lay + 1][row, : len(seq)].clone() for lay in s.layers},
            )

    return {"hs": hidden_states}


def main() -> None:
    args = arguments()
    s = prepare(args)
    capturer, batches, layers, seqs = s.capturer, s.batches, s.layers, s.seqs
    n_tokens = sum(map(len, seqs))

    # Both ways are functions of a batch index, timed batch by batch in turns; the common way
    # runs in its own process without raypipe's allocator settings unless --same-process.
    def ours(out: Path, i: int):
        b = batches[i]
        for j, (q, acts) in enumerate(zip(b, capturer.capture(b))):
            rec = build_capture(
                prompt_text="",
                response_text="",
                tokens=[""] * len(q),
                token_ids=q,
                prompt_end=len(q) // 2,
                activations=acts,
                component="residual",
            )
            write_capture(out / f"{i}-{j}.pt", rec)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"ours": Path(tmp, "ours"), "hs": Path(tmp, "hs")}
        for d in dirs.values():
            d.mkdir()
        args.hs_dir = str(dirs["hs"])
        if args.same_process:
            hs, elsewhere = common_way(args, s)["hs"], None
        else:
            elsewhere = Elsewhere(common_way, args, {"RAYPIPE_MALLOC_TUNING": "0"})
            hs = elsewhere["hs"]
        t = Rounds(
            {"ours": lambda i: ours(dirs["ours"], i), "hs": hs},
            args.device,
            args.repeats,
            len(batches),
        )
        if elsewhere is not None:
            elsewhere.close()
        b_ours, b_hs = folder_bytes(dirs["ours"]), folder_bytes(dirs["hs"])
    t_ours, t_hs = t.seconds("ours"), t.seconds("hs")
    print(
        f"device={args.device} dtype={args.dtype} prompts={len(seqs)} tokens={n_tokens} "
        f"layers={layers} common way: "
        + ("this process" if args.same_process else "own process, glibc allocator defaults")
    )
    print(
        f"  raypipe capture          {t_ours:7.2f} s {n_tokens / t_ours:9.0f} tok/s "
        f"{b_ours / n_tokens:8.0f} bytes/token"
    )
    print(
        f"  hidden_states -> host    {t_hs:7.2f} s {n_tokens / t_hs:9.0f} tok/s "
        f"{b_hs / n_tokens:8.0f} bytes/token"
    )
    emit(
        {
            "device": args.device,
            "common_way": "same process" if args.same_process else "own process",
            "capture_speedup_vs_hidden_states": round(t.ratio("hs", "ours"), 2),
            "capture_bytes_per_token": round(b_ours / n_tokens),
            "hidden_states_bytes_per_token": round(b_hs / n_tokens),
        }
    )


def capturer_batches(capturer: Capturer, seqs: list[list[int]]) -> list[list[int]]:
    from raypipe.engine.batching import plan_batches

    lengths = [len(s) for s in seqs]
    return plan_batches(lengths, capturer.max_batch_tokens, overhead_tokens=capturer.overhead)


if __name__ == "__main__":
    main()
