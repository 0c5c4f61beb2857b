"""Tiny random Llama models and a word-level tokenizer, built in the test: fast, exact, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

WORDS = (
    "the a is of to and in it you that was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new "
    "work part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want "
    "air well also play small end put home read hand port large spell add even land here must "
    "big high such follow act why ask men change went light kind off need house picture try us "
    "? . , ! capital France Paris"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in WORDS if w not in SPECIALS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv: int = 2,
    seed: int = 0,
    vocab: int = 256,
    positions: int = 256,
):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).float().eval()


def save_tiny_model(folder: Path, **kwargs) -> Path:
    model = tiny_llama(**kwargs)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_vectors(
    exp_dir: Path,
    traits: list[str],
    n_layers: int,
    hidden: int,
    variant: str = "base",
    seed: int = 0,
    position: str = "response[:]",
) -> None:
    """Random unit-ish vectors in the SPEC layout, with metadata (baseline, effect sizes)."""
    from raypipe.store.paths import sanitize_position

    g = torch.Generator().manual_seed(seed)
    for trait in traits:
        for method in ("probe", "mean_diff"):
            d = (
                exp_dir
                / "extraction"
                / trait
                / variant
                / "vectors"
                / sanitize_position(position)
                / "residual"
                / method
            )
            d.mkdir(parents=True, exist_ok=True)
            layers = {}
            for layer in range(n_layers):
                v = torch.randn(hidden, generator=g)
                torch.save(v, d / f"layer{layer}.pt")
                layers[str(layer)] = {
                    "norm": float(v.norm()),
                    "baseline": 0.25 * layer,
                    "val_effect_size": float(layer == 1) + 0.1 * layer * (method == "probe"),
                }
            (d / "metadata.json").write_text(
                json.dumps(
                    {
                        "model": "tiny",
                        "trait": trait,
                        "method": method,
                        "component": "residual",
                        "position": position,
                        "layers": layers,
                        "timestamp": "2026-01-01T00:00:00",
                    }
                )
            )


def write_prompt_set(root: Path, name: str, texts: list[str]) -> None:
    path = root / "datasets" / "inference" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "name": name,
                "prompts": [{"id": i, "text": t} for i, t in enumerate(texts)],
            }
        )
    )


def saved_vectors(pairs, traits=None, method="probe", position="response[:]", folder=None):
    """VectorSpecs (what stages take) for (layer, values) pairs, each saved as a `.pt` file.
    Without `folder`, files go to a content-addressed folder under the temp dir."""
    import hashlib
    import tempfile

    from raypipe.store.vectors import VectorSpec, file_digest

    folder = Path(folder or Path(tempfile.gettempdir()) / "raypipe-test-vectors")
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, (layer, values) in enumerate(pairs):
        t = torch.as_tensor(values, dtype=torch.float32)
        name = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:20]
        path = folder / f"{name}.pt"
        if not path.is_file():
            tmp = path.with_suffix(f".{i}.tmp")
            torch.save(t.clone(), tmp)
            tmp.replace(path)
        trait = traits[i % len(traits)] if traits else "behavior/alpha"
        specs.append(
            VectorSpec(
                trait,
                method,
                position,
                "residual",
                layer,
                "layers_arg",
                0.0,
                path,
                file_digest(path),
            )
        )
    return tuple(specs)
