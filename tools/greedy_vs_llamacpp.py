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
        [--llama-attention f32|no-fa|default] [--quantize-args '...']

With `--gguf FILE --prompt TEXT [--tokens N]` it compares the two engines' own greedy runs on any GGUF instead:
1. FILE is converted with the converter's defaults (cached: llamacpp_compare.prepare_given_model);
2. llama.cpp's `llama-completion` (built on first use) generates N tokens greedily from TEXT as a plain completion
   (`--temp 0 --top-k 1 --seed 0 -no-cnv`: no chat template, no sampling; it stops early at an end-of-generation
   token). Its text comes from that run; its ids from a second run that saves its session (`--prompt-cache FILE
   --prompt-cache-all`), whose header holds every token id it evaluated (the prompt's, which must be ours, then
   the generated ones), when its text is the first run's: a text can tokenize to other ids than the ones
   generated, so ids are compared, not a re-tokenized text. Saving a session evaluates the prompt's last token
   apart from the rest, and on a near-tie that can flip llama.cpp's choice (it did on Qwen2.5-Coder-0.5B with an
   f16 KV cache); then the ids are the first run's text tokenized by ours, checked to give that text back;
3. ours generates N tokens greedily from the same ids on one rank, in this process, through the scheduler the
   command line uses (batched prefill, then decode), with each step's top log-probabilities;
4. it prints both texts, how many greedy tokens are equal before the first divergence, and at a divergence our
   logits there: our top-1 over top-2 margin and our margin of our token over llama.cpp's (a near-tie decides it),
   and over the equal steps our smallest top-1 over top-2 margin (the closest either engine came to a tie); at a
   divergence also llama.cpp's log-probability of its token over ours after the same tokens, as `llama-perplexity`
   scores them (in one batch: llama-completion's token-by-token decode can differ from it by a few 0.01 nats).
`--llama-attention` as above, plus `no-fa`: llama.cpp without flash attention but its f16 KV cache (ours f16).
llama.cpp's settings are printed; `--json FILE` writes the ids and margins.

    python tools/greedy_vs_llamacpp.py --gguf FILE --prompt TEXT [--tokens 32] [--llama-attention f32|no-fa|default]
        [--buffer-float-type q80|f32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dllama_mpi.model import quant
from llamacpp_compare import (
    LLAMA_CPP_PYTHON_VERSION,
    LLAMA_F32_ATTENTION,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    build_llama_bench,
    default_cache_dir,
    llama_quantize_path,
    prepare_given_model,
    run_capture,
)

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
WIDTH = 256  # the padded dim and hidden: one k-quant super-block
CTX = 128
# --llama-attention: llama.cpp's arguments, and the --kv-type that gives ours the KV cache llama.cpp holds
LLAMA_ATTENTION = {
    "f32": (LLAMA_F32_ATTENTION, "f32"),  # no flash attention (its CPU kernel has f16 internals), an f32 cache
    "no-fa": (("-fa", "off"), "f16"),  # no flash attention, its default f16 cache
    "default": ((), "f16"),  # flash attention (auto: on, on a CPU), an f16 cache
}
# llama-completion as a greedy plain completion: no sampling, no chat template, nothing printed but the text
LLAMA_GREEDY = ("--temp", "0", "--top-k", "1", "--seed", "0", "-no-cnv", "--no-warmup", "--simple-io", "--no-display-prompt",
                "--verbose-prompt")
SESSION_MAGIC, SESSION_VERSION = 0x6767736E, 10  # llama.h's LLAMA_SESSION_MAGIC ('ggsn') and _VERSION of 0.3.36


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


def llama_tool(cache: Path, name: str) -> Path:
    """llama.cpp's binary `name` (llama-perplexity, llama-completion) of llamacpp_compare's build, built if missing."""
    build_llama_bench(cache, LLAMA_CPP_PYTHON_VERSION, jobs=2, niceness=19)
    binary = cache / "build" / "bin" / name
    if not binary.exists():
        run_capture(["cmake", "--build", str(cache / "build"), "--target", name], 3600, "greedy_vs_llamacpp")
    return binary


def session_tokens(path: Path) -> list[int]:
    """The token ids at the head of a llama.cpp session file (magic, version, count, then int32 ids)."""
    with open(path, "rb") as f:
        magic, version, count = np.frombuffer(f.read(12), np.uint32)
        if (magic, version) != (SESSION_MAGIC, SESSION_VERSION):
            sys.exit(f"greedy_vs_llamacpp: {path} is no llama.cpp session file of version {SESSION_VERSION} "
                     f"(magic {magic:#x}, version {version})")
        return np.frombuffer(f.read(4 * int(count)), np.int32).tolist()


def prompt_count(stderr: str) -> int:
    """The prompt's length that llama-completion --verbose-prompt logs."""
    found = re.search(r"number of tokens in prompt = (\d+)", stderr)
    if not found:
        sys.exit("greedy_vs_llamacpp: llama-completion --verbose-prompt logged no prompt length")
    return int(found.group(1))


def llama_greedy_command(binary: Path, gguf: Path, prompt: str, tokens: int, ctx: int, attention: str,
                         threads: int = 2) -> list[str]:
    return [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(tokens), "-c", str(ctx), "-t", str(threads),
            *LLAMA_GREEDY, *LLAMA_ATTENTION[attention][0]]


def llama_output(command: list[str]) -> tuple[bytes, str]:
    """(the generated text's bytes, stderr) of a llama_greedy_command run: stdout less the "\n\n" llama-completion
    ends with and the " [end of text]\n" it prints at an end-of-generation token."""
    done = subprocess.run(command, capture_output=True, timeout=3600)
    if done.returncode:
        sys.exit(f"{done.stderr.decode(errors='replace')[-6000:]}\ngreedy_vs_llamacpp: failed ({done.returncode}): "
                 f"{shlex.join(command)}")
    return done.stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n"), done.stderr.decode(errors="replace")


def llama_greedy(command: list[str], session: Path, tok) -> tuple[list[int], list[int], bytes, str]:
    """(prompt ids, generated ids, generated text, where the ids come from) of llama.cpp's greedy run `command`.
    The text is the plain run's. The ids are those of a second run that saves its session (see the module), when
    that run's text is the plain run's; else (saving the session evaluates the prompt's last token apart, which
    can flip a near-tie) the plain run's text tokenized by ours, which gives it back byte for byte."""
    text, _ = llama_output(command)
    session.unlink(missing_ok=True)
    _, err = llama_output([*command, "--prompt-cache", str(session), "--prompt-cache-all"])
    ids = session_tokens(session)
    n_prompt = prompt_count(err)
    prompt_ids, ids = ids[:n_prompt], ids[n_prompt:]
    if text_bytes(tok, ids, prompt_ids[-1]) == text:
        return prompt_ids, ids, text, "its session (the same text as the plain run)"
    ids = tok.encode(text.decode(errors="replace"), bos=False, special=False)
    if text_bytes(tok, ids, prompt_ids[-1]) != text:
        sys.exit("greedy_vs_llamacpp: llama.cpp's text does not tokenize back to itself, and its session run's text "
                 "differs: no ids to compare")
    return prompt_ids, ids, text, "its text tokenized by ours (its session run took another path)"


def one_rank_job(model: Path, max_seq_len: int, kv_type: str, buffer: str):
    """`model` loaded on one rank in this process (no mpiexec)."""
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    return open_job(Comm(), model, (1,), max_seq_len=max_seq_len, buffer_type=buffer, kv_type=kv_type)


def our_greedy(job, prompt_ids: list[int], tokens: int, top: int = 5) -> list:
    """[TokenLogprob of each step]: `tokens` greedy steps of a one_rank_job through the scheduler (the command line's
    path: the prompt prefilled in one batch, then decode), never stopping (an end-of-generation token is a step too)."""
    from dllama_mpi.serving.request import Failed, GenRequest, Piece, Sampling
    from dllama_mpi.serving.scheduler import Scheduler

    events: list = []
    scheduler = Scheduler(job)
    scheduler.submit(GenRequest(list(prompt_ids), tokens, Sampling(temperature=0.0), stop_ids=(), logprobs=top,
                                emit=events.append))
    scheduler.run(until=lambda: bool(events) and not isinstance(events[-1], Piece))
    if isinstance(events[-1], Failed):
        raise RuntimeError(events[-1].message)
    return [e.logprob for e in events if isinstance(e, Piece)]


def text_bytes(tok, ids: list[int], before: int = -1) -> bytes:
    """The bytes of `ids`, the first decoded as following `before` (-1: nothing)."""
    return b"".join(tok.decode(a, b) for a, b in zip([before, *ids], ids))


def llama_margin(cache: Path, gguf: Path, attention: str, tok, context: list[int], theirs: int, ours: int,
                 tmp: Path) -> float | None:
    """llama.cpp's log-probability of `theirs` over `ours` after `context` (nats = logits), from `llama-perplexity
    --kl-divergence-base`: one chunk of len(context) + 1 tokens, whose scored second half ends with the row after
    `context`. None when its text does not tokenize back to those ids, or the chunk's first half is too long."""
    from dllama_mpi.commands import perplexity

    ctx = len(context) + 1
    if ctx // 2 > len(context) - 1:
        return None
    filler = (REPO / "tests" / "data" / "tinystories_sample.txt").read_bytes()  # llama-perplexity wants 2 chunks
    (tmp / "chunk.txt").write_bytes(text_bytes(tok, [*context, theirs]) + b"\n\n" + filler)
    run_capture([str(llama_tool(cache, "llama-perplexity")), "-m", str(gguf), "-f", str(tmp / "chunk.txt"), "-c",
                 str(ctx), "-b", str(ctx), "--chunks", "1", "-t", "2", *LLAMA_ATTENTION[attention][0], "--kl-divergence-base",
                 str(tmp / "llama.kld")], 3600, "greedy_vs_llamacpp")
    base = perplexity.read_base(tmp / "llama.kld")
    if base.llama_tokens[0].tolist() != [*context, theirs]:
        return None
    row = perplexity.BaseLogProbs(base)(0, int(base.attrs["n_scored"]))[-1]
    return float(row[theirs] - row[ours])


def compare_greedy(llama_ids: list[int], steps: list, stop_ids: tuple[int, ...], tokens: int) -> dict:
    """Where our greedy steps (TokenLogprob each) and llama.cpp's generated ids part. llama.cpp stops before an
    end-of-generation token (fewer than `tokens` ids): the step where ours takes one of `stop_ids` then agrees."""
    ours = [s.token for s in steps]
    equal = 0
    while equal < min(len(llama_ids), len(ours)) and llama_ids[equal] == ours[equal]:
        equal += 1
    both_ended = len(llama_ids) < tokens and equal == len(llama_ids) and equal < len(ours) and ours[equal] in stop_ids
    margins = [s.top[0][1] - s.top[1][1] for s in steps]
    result = {"equal": equal + both_ended, "compared": min(len(llama_ids) + (len(llama_ids) < tokens), len(ours)),
              "llama_ended": len(llama_ids) < tokens, "divergence": None,
              "our_margins": margins, "our_ids": ours, "llama_ids": list(llama_ids)}
    if equal < result["compared"] and not both_ended:
        step = steps[equal]
        theirs = llama_ids[equal] if equal < len(llama_ids) else None  # None: llama.cpp ended there
        ranked = dict(step.top)
        result["divergence"] = {
            "step": equal, "ours": step.token, "llama": theirs, "our_top2_margin": margins[equal],
            # our logit of our token over llama.cpp's (log-probabilities of one step differ as its logits do)
            "our_margin_over_llama": step.top[0][1] - ranked[theirs] if theirs in ranked else None,
            "llama_rank_in_ours": [t for t, _ in step.top].index(theirs) + 1 if theirs in ranked else None}
    return result


def gguf_mode(args, cache: Path) -> int:
    from dllama_mpi.files.modelfile import open_model

    gguf, h5 = prepare_given_model(cache, args.gguf)
    kv = LLAMA_ATTENTION[args.llama_attention][1]
    tokenizer = open_model(h5).tokenizer()
    our_prompt = tokenizer.encode(args.prompt, bos=True, special=True)  # as the command line's
    with tempfile.TemporaryDirectory(prefix="greedy_vs_llamacpp-") as name:
        tmp = Path(name)
        command = llama_greedy_command(llama_tool(cache, "llama-completion"), gguf, args.prompt, args.tokens,
                                       len(our_prompt) + args.tokens + 1, args.llama_attention)
        llama_prompt, llama_ids, llama_text, ids_from = llama_greedy(command, tmp / "session.bin", tokenizer)
        shown = shlex.join(["llama-completion", *command[1:]]).replace(shlex.quote(str(gguf)), "MODEL")
        print(f"model: {gguf} (ours: {h5})")
        print(f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s), attention {args.llama_attention}: {shown}; "
              f"its ids: {ids_from}")
        print(f"ours: 1 rank, buffers {args.buffer_float_type}, KV cache {kv}, greedy through the scheduler")
        if our_prompt != llama_prompt:
            print(f"the prompt's ids differ: llama.cpp {llama_prompt}, ours {our_prompt}: no comparison")
            return 1
        job = one_rank_job(h5, len(llama_prompt) + args.tokens + 1, kv, args.buffer_float_type)
        r = compare_greedy(llama_ids, our_greedy(job, llama_prompt, args.tokens), job.stop_ids, args.tokens)
        if (d := r["divergence"]) is not None and d["llama"] is not None:
            d["llama_margin_over_ours"] = llama_margin(cache, gguf, args.llama_attention, tokenizer,
                                                       [*llama_prompt, *llama_ids[: d["step"]]], d["llama"], d["ours"],
                                                       tmp)

    def text(ids: list[int]) -> str:
        return text_bytes(tokenizer, ids, llama_prompt[-1]).decode(errors="replace")

    print(f"prompt: {args.prompt!r} ({len(llama_prompt)} tokens: {llama_prompt})")
    ended = " (then an end-of-generation token)" if r["llama_ended"] else ""
    print(f"llama.cpp: {llama_text.decode(errors='replace')!r}{ended}")
    print(f"ours:      {text(r['our_ids'])!r}")
    last = r["equal"] if r["divergence"] else r["compared"]
    low = int(np.argmin(r["our_margins"][:last])) if last else None
    print(f"greedy tokens equal: {r['equal']} of {r['compared']}; first divergence: "
          + ("none" if r["divergence"] is None else f"step {r['divergence']['step']}")
          + ("" if low is None else f"; our smallest top-1 over top-2 margin before it: "
                                    f"{r['our_margins'][low]:.4f} logits at step {low}"))
    if (d := r["divergence"]) is not None:
        theirs = "an end-of-generation token" if d["llama"] is None else f"{d['llama']} ({text([d['llama']])!r})"
        over = ("not in our top 5" if d["our_margin_over_llama"] is None else
                f"{d['our_margin_over_llama']:.4f} logits over it (our #{d['llama_rank_in_ours']})")
        print(f"  step {d['step']}: llama.cpp took {theirs}, ours {d['ours']} ({text([d['ours']])!r}): our top-1 over "
              f"top-2 margin {d['our_top2_margin']:.4f} logits; ours {over}")
        if d.get("llama_margin_over_ours") is not None:
            print(f"  llama.cpp's log-probability of its token over ours there (llama-perplexity, same settings): "
                  f"{d['llama_margin_over_ours']:.4f} nats")
    if args.json:
        args.json.write_text(json.dumps({"gguf": str(gguf), "prompt": args.prompt, "prompt_ids": llama_prompt,
                                         "llama_attention": args.llama_attention, "llama_command": shown,
                                         "llama_ids_from": ids_from,
                                         "our_kv_type": kv, "our_buffers": args.buffer_float_type, **r}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/greedy_vs_llamacpp.py", allow_abbrev=False,
                                description="Our greedy steps against llama.cpp's on one k-quant GGUF of a trained model "
                                            "(stories260K padded), or on --gguf FILE from --prompt TEXT.")
    p.add_argument("--gguf", type=Path, help="compare the two engines' greedy runs on this GGUF (with --prompt)")
    p.add_argument("--prompt", help="--gguf's prompt, a plain completion (no chat template)")
    p.add_argument("--tokens", type=int, default=32, help="--gguf's greedy tokens (default: %(default)s)")
    p.add_argument("--json", type=Path, help="--gguf: write the ids and margins to this file")
    padded = ("--type", "--text", "--wo-type", "--quantize-args")  # the padded stories260K's alone
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (default: %(default)s)")
    p.add_argument("--buffer-float-type", choices=quant.BUFFER_TYPES, default=quant.Q80_ACTIVATIONS.name,
                   help="ours (default: %(default)s)")
    p.add_argument("--text", type=Path, default=REPO / "tests" / "data" / "tinystories_sample.txt",
                   help="the prompt is its first tokens")
    p.add_argument("--wo-type", default="q8_0", help="llama-quantize's type for the 64-wide attn_output, or "
                   "'fallback' for its own choice (default: %(default)s)")
    p.add_argument("--llama-attention", choices=tuple(LLAMA_ATTENTION), default="f32",
                   help="llama.cpp's attention: in f32 (ours then --kv-type f32), without flash attention over its "
                        "f16 KV cache (no-fa), or its defaults (flash attention, an f16 KV cache); ours then has an "
                        "f16 KV cache, its default (default: %(default)s)")
    p.add_argument("--quantize-args", default="", help="more llama-quantize arguments, e.g. "
                   "'--tensor-type blk\\.2\\.attn_q=q6_k' (one string)")
    args = p.parse_args(argv)
    if args.gguf is not None:
        given = [o for o in padded if getattr(args, o[2:].replace("-", "_")) != p.get_default(o[2:].replace("-", "_"))]
        if given:
            p.error(f"{' '.join(given)}: for the padded stories260K only; leave them out with --gguf")
        if args.prompt is None or args.tokens < 1:
            p.error("--gguf needs --prompt TEXT and --tokens N >= 1")
        if not args.gguf.is_file():
            p.error(f"--gguf {args.gguf}: no such file")
    elif args.prompt is not None or args.json is not None:
        p.error("--prompt and --json go with --gguf")
    cache = default_cache_dir(LLAMA_CPP_PYTHON_VERSION)
    return gguf_mode(args, cache) if args.gguf is not None else padded_mode(args, cache)


def padded_mode(args, cache: Path) -> int:
    from dllama_mpi.commands import perplexity
    from dllama_mpi.files.modelfile import open_model

    llama_perplexity = llama_tool(cache, "llama-perplexity")
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
        attention, kv = LLAMA_ATTENTION[args.llama_attention]
        run = prompt + engine_dump(t / "q.h5", t / "ours.npz", prompt, CTX + 8 - len(prompt),
                                   args.buffer_float_type, kv)["greedy"].tolist()
        # llama-perplexity wants two chunks of text; it scores the first alone (--chunks 1)
        (t / "run.txt").write_bytes(b"".join(tok.decode(a, b) for a, b in zip(run, run[1:])) + b"\n" + text.encode())
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
