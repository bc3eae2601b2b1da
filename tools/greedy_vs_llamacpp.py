"""`python tools/greedy_vs_llamacpp.py`: does llama.cpp, on the same k-quant GGUF of a trained model, take the
greedy steps we take, and how far apart are the two log-probability distributions?

A trained model is needed (a random one's flat distributions flip their top token on any rounding), and one
whose rows llama-quantize can make k-quants of (256-value super-blocks); stories260K's are 64 and 172 wide. So:
1. stories260K is written as a GGUF zero-padded to dim 256 and hidden 256: the same function (padded
   dimensions stay 0 through every layer; RMSNorm's mean over 4x the width is undone by halving its weights and
   quartering its epsilon), with tok512's vocabulary (`padded_stories_gguf`);
2. llama.cpp's `llama-quantize` makes it `--type` (default Q4_K_M). Its `wo` stays 64 wide, too narrow for a
   k-quant: llama-quantize's fallback for it is Q5_0 (our converter keeps it, as q50); by default it is asked for
   Q8_0 (`--wo-type`), as in the measurements of docs/quality.md;
3. `dllama-mpi-convert` converts that GGUF; ours generates greedily after a 64-token prompt (BOS and the start of
   the sample text) to fill a context of 128;
4. `llama-perplexity --kl-divergence-base --chunks 1` scores that very token sequence (checked to tokenize to our
   ids): its log-probabilities at the 63 positions it scores (the second half of the chunk) give llama.cpp's
   greedy choice after each of our steps. Equal at every step = the same greedy run. By default llama.cpp
   attends in f32 (`-fa off -ctk f32 -ctv f32`) and ours with `--kv-type f32`; `--llama-attention default`
   leaves llama.cpp its own (flash attention with f16 internals, an f16 KV cache) and ours its f16 KV cache.
It prints how many steps agree, the first that does not, and the largest difference between our log-probabilities
and llama.cpp's over the tokens within 8 nats of each position's top (llama.cpp saves them to within 1.2e-4).
At a step where they differ it prints both log-probabilities (the margin) and what an f32 engine run of the
model as dequantized (`--weights f32`) ranks first there.

    python tools/greedy_vs_llamacpp.py [--type Q4_K_M] [--buffer-float-type q80|f32] [--wo-type q8_0|fallback]
        [--llama-attention f32|default] [--quantize-args '...']
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dllama_mpi.model import quant
from llamacpp_compare import (
    LLAMA_CPP_PYTHON_VERSION,
    LLAMA_F32_ATTENTION,
    OUR_KV_TYPE,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    build_llama_bench,
    default_cache_dir,
    llama_quantize_path,
    run_capture,
)

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
WIDTH = 256  # the padded dim and hidden: one k-quant super-block
CTX = 128


def padded_stories_gguf(path: Path, checkpoint: Path = STORIES / "stories260K.bin",
                        tokenizer: Path = STORIES / "tok512.bin") -> None:
    """stories260K as an F32 GGUF of dim and hidden WIDTH, the same function (see the module)."""
    import gguf

    from dllama_mpi.files.convert import llama2c

    source = llama2c.read(checkpoint, tokenizer)
    h, t = source.spec_fields, dict(source.tensors())
    q_dim, kv_dim = h["n_heads"] * h["head_dim"], h["n_kv_heads"] * h["head_dim"]

    def pad(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
        out = np.zeros((rows, cols), np.float32)
        out[: a.shape[0], : a.shape[1]] = a
        return out

    def norm(weight: np.ndarray) -> np.ndarray:  # the mean of squares over WIDTH is 1/4 of it over dim 64
        out = np.zeros(WIDTH, np.float32)
        out[: weight.size] = weight * np.float32(np.sqrt(h["dim"] / WIDTH))
        return out

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(h["seq_len"])
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(WIDTH)
    w.add_block_count(h["n_layers"])
    w.add_head_count(h["n_heads"])
    w.add_head_count_kv(h["n_kv_heads"])
    w.add_key_length(h["head_dim"])
    w.add_value_length(h["head_dim"])
    w.add_rope_dimension_count(h["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5 * h["dim"] / WIDTH)
    w.add_vocab_size(h["vocab_size"])
    tok = source.tokenizer
    pieces = [p.decode("utf-8") for p in tok.pieces[: h["vocab_size"]]]
    pieces[1:3] = ["<s>", "</s>"]  # llama2.c writes them as "\n<s>\n"
    types = [TOKEN_UNKNOWN if i == 0 else TOKEN_CONTROL if i in (1, 2)
             else TOKEN_BYTE if p.startswith("<0x") and len(p) == 6 else TOKEN_NORMAL for i, p in enumerate(pieces)]
    w.add_tokenizer_model("llama")
    w.add_token_list([p.replace(" ", "\u2581") if k == TOKEN_NORMAL else p for p, k in zip(pieces, types)])
    w.add_token_scores([float(s) for s in tok.scores[: h["vocab_size"]]])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", pad(t["tok_embeddings"], h["vocab_size"], WIDTH))
    for i in range(h["n_layers"]):
        p, layer = f"blk.{i}.", f"layers/{i}/"
        w.add_tensor(p + "attn_norm.weight", norm(t[layer + "attention_norm"]))
        w.add_tensor(p + "attn_q.weight", pad(t[layer + "wq"], q_dim, WIDTH))
        w.add_tensor(p + "attn_k.weight", pad(t[layer + "wk"], kv_dim, WIDTH))
        w.add_tensor(p + "attn_v.weight", pad(t[layer + "wv"], kv_dim, WIDTH))
        w.add_tensor(p + "attn_output.weight", pad(t[layer + "wo"], WIDTH, q_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(t[layer + "ffn_norm"]))
        w.add_tensor(p + "ffn_gate.weight", pad(t[layer + "w1"], WIDTH, WIDTH))
        w.add_tensor(p + "ffn_down.weight", pad(t[layer + "w2"], WIDTH, WIDTH))
        w.add_tensor(p + "ffn_up.weight", pad(t[layer + "w3"], WIDTH, WIDTH))
    w.add_tensor("output_norm.weight", norm(t["norm"]))
    w.add_tensor("output.weight", pad(t["tok_embeddings"], h["vocab_size"], WIDTH))  # stories260K ties them
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def engine_dump(model: Path, out: Path, tokens: list[int], steps: int, buffer: str, kv_type: str) -> dict:
    """tests/engine_dump.py on one rank: logits of `tokens` and `steps` greedy ids after them."""
    subprocess.run([sys.executable, str(REPO / "tests" / "engine_dump.py"), str(model), str(out), "--budgets", "1",
                    "--tokens", *map(str, tokens), "--steps", str(steps), "--buffer", buffer, "--kv-type", kv_type],
                   check=True, capture_output=True)
    return dict(np.load(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/greedy_vs_llamacpp.py", allow_abbrev=False,
                                description="Our greedy steps against llama.cpp's on one k-quant GGUF of a trained model.")
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (default: %(default)s)")
    p.add_argument("--buffer-float-type", choices=quant.BUFFER_TYPES, default=quant.Q80_ACTIVATIONS.name,
                   help="ours (default: %(default)s)")
    p.add_argument("--text", type=Path, default=REPO / "tests" / "data" / "tinystories_sample.txt",
                   help="the prompt is its first tokens")
    p.add_argument("--wo-type", default="q8_0", help="llama-quantize's type for the 64-wide attn_output, or "
                   "'fallback' for its own choice (default: %(default)s)")
    p.add_argument("--llama-attention", choices=("f32", "default"), default="f32",
                   help="llama.cpp's attention: in f32 (ours then --kv-type f32), or its defaults (an f16 KV cache, "
                        "as ours by default) (default: %(default)s)")
    p.add_argument("--quantize-args", default="", help="more llama-quantize arguments, e.g. "
                   "'--tensor-type blk\\.2\\.attn_q=q6_k' (one string)")
    args = p.parse_args(argv)
    from dllama_mpi.commands import perplexity
    from dllama_mpi.files.modelfile import open_model

    cache = default_cache_dir(LLAMA_CPP_PYTHON_VERSION)
    build_llama_bench(cache, LLAMA_CPP_PYTHON_VERSION, jobs=2, niceness=19)
    llama_perplexity = cache / "build" / "bin" / "llama-perplexity"
    if not llama_perplexity.exists():
        run_capture(["cmake", "--build", str(cache / "build"), "--target", "llama-perplexity"], 3600, "greedy_vs_llamacpp")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        padded_stories_gguf(t / "f32.gguf")
        wo = [] if args.wo_type == "fallback" else ["--tensor-type", f"attn_output={args.wo_type}"]
        quantize = [str(llama_quantize_path(cache)), *wo, *args.quantize_args.split()]
        run_capture([*quantize, str(t / "f32.gguf"), str(t / "q.gguf"), args.type, "2"], 3600, "greedy_vs_llamacpp")
        for name, extra in (("q.h5", []), ("dequantized.h5", ["--weights", "f32"])):
            subprocess.run([sys.executable, "-m", "dllama_mpi", "convert", str(t / "q.gguf"), str(t / name), *extra],
                           check=True, capture_output=True)
        tok = open_model(t / "q.h5").tokenizer()
        text = args.text.read_text()
        prompt = tok.encode(text, bos=True)[: CTX // 2]
        kv = OUR_KV_TYPE[args.llama_attention]
        run = prompt + engine_dump(t / "q.h5", t / "ours.npz", prompt, CTX + 8 - len(prompt),
                                   args.buffer_float_type, kv)["greedy"].tolist()
        # llama-perplexity wants two chunks of text; it scores the first alone (--chunks 1)
        (t / "run.txt").write_bytes(b"".join(tok.decode(a, b) for a, b in zip(run, run[1:])) + b"\n" + text.encode())
        attention = LLAMA_F32_ATTENTION if args.llama_attention == "f32" else ()
        run_capture([str(llama_perplexity), "-m", str(t / "q.gguf"), "-f", str(t / "run.txt"), "-c", str(CTX),
                     "--chunks", "1", "-t", "2", *attention, "--kl-divergence-base", str(t / "llama.kld")], 3600,
                    "greedy_vs_llamacpp")
        base = perplexity.read_base(t / "llama.kld")
        scored_tokens = base.llama_tokens[0].tolist()
        if scored_tokens != run[:CTX]:
            first = next(i for i, (a, b) in enumerate(zip(scored_tokens, run)) if a != b)
            print(f"llama.cpp tokenized our run's text differently from position {first}: no comparison")
            return 1
        log_probs = perplexity.BaseLogProbs(base)(0, int(base.attrs["n_scored"]))  # positions CTX/2 .. CTX-2
        ours = np.array(run[CTX // 2 + 1 : CTX])
        theirs = log_probs.argmax(axis=1)
        ranked = np.sort(log_probs, axis=1)
        logits = engine_dump(t / "q.h5", t / "scored.npz", run[:CTX], 0, args.buffer_float_type, kv)["logits"]
        our_log_probs = perplexity.log_softmax(logits[CTX // 2 : CTX - 1].astype(np.float64))
        near_top = log_probs > ranked[:, -1:] - 8
        gap = np.abs(np.where(near_top, our_log_probs - log_probs, 0)).max(axis=1)
        differing = np.flatnonzero(theirs != ours)
        print(f"stories260K padded to {WIDTH}, llama-quantize {args.type} (attn_output {args.wo_type}); ours with "
              f"{args.buffer_float_type} buffers, greedy after a {len(prompt)}-token prompt; llama.cpp {cache.name}, "
              f"attention {args.llama_attention}")
        print(f"greedy steps: {len(ours)}; llama.cpp's top token is ours at {int((theirs == ours).sum())}; first "
              f"difference: {'none' if not differing.size else f'step {differing[0]}'}; its own top-1 over top-2 "
              f"margin: median {np.median(ranked[:, -1] - ranked[:, -2]):.3f} nats")
        print(f"log-probabilities within 8 nats of the top, |ours - llama.cpp|: max {gap.max():.2g}, median over "
              f"positions of each one's max {np.median(gap):.2g} nats")
        if differing.size:
            reference = engine_dump(t / "dequantized.h5", t / "reference.npz", run[:CTX], 0, "f32", kv)["logits"]
        for step in differing:
            pos = CTX // 2 + step
            top, mine = log_probs[step, theirs[step]], log_probs[step, ours[step]]
            print(f"  step {step}: llama.cpp's top {theirs[step]} ({top:.4f}) over ours {ours[step]} ({mine:.4f}): "
                  f"{top - mine:.4f} nats; the dequantized model in f32 ranks {int(reference[pos].argmax())} first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
