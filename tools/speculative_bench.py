"""`python tools/speculative_bench.py`: tokens/s with and without speculative decoding, ours and llama.cpp's, on
three tasks with a real model and on stories260K, with the acceptance rate and our collective rounds per token.

The tasks (greedy, temperature 0; each stops at --steps tokens or an end-of-generation token):
- code: a plain Python completion (no chat template): a class whose methods repeat each other's identifiers;
- rewrite: chat-formatted, "Rewrite the following paragraph, fixing only the spelling: ..." (about 150 words
  with a few typos): the answer copies the prompt;
- chat: chat-formatted, an open question ("What is a hash table?");
- stories: stories260K, "Once upon a time", 200 tokens by default (end-of-generation tokens ignored by both
  engines: the model ends a story with BOS, where ours stops and llama.cpp does not).
The chat prompts are Qwen's template rendered by hand as text and given as the prompt to both engines: ours
parses special-token text in --prompt, and llama.cpp's llama-completion and llama-lookup tokenize -p with
parse_special (common_tokenize(ctx, prompt, true, true) in tools/completion/completion.cpp and
examples/lookup/lookup.cpp).

What runs, interleaved, --repeat rounds (each round runs every task's every configuration once):
- ours: `mpiexec -n N python -m dllama_mpi --model M.h5 --prompt TEXT --steps S` for N in --ranks, with
  `--speculate 0` (off), with no flag (the default: draftless prompt lookup) and with `--speculate K` for each
  K of --speculate. Its stderr's speed line gives decode tokens/s ("decode: N tokens, X tokens/s": the tokens
  after the first over the time from the first to the last) and its `speculation:` line the tokens per step,
  drafted and accepted tokens and collective rounds per token (None where the line is absent: speculation off,
  or an engine without it). When `python -m dllama_mpi --help` lists no --speculate, only the no-flag run is
  made, as the baseline.
- llama.cpp (llama-cpp-python 0.3.36's, tools/llamacpp_compare.py's build; llama-lookup and
  llama-completion built on first use): `llama-completion -no-cnv --temp 0 -n S` (its "eval time" line's
  tokens per second: decode calls over their time, the first token being the prompt's) and `llama-lookup
  --temp 0 -n S-1` (prompt lookup; it stops once it has MORE than -n tokens, so -n S-1 gives at least S; its
  rate here is (n_predict - 1) / its "decoded ... in T seconds", as ours; n_drafted, n_accept from its stats;
  target steps = n_predict - n_accept, as each of its steps accepts a run of drafts and adds one token), at its
  default draft length (--spec-draft-n-max 3) and at each K of --speculate.
The real model's GGUF is converted once with dllama-mpi-convert's defaults; stories260K is made a GGUF once
with llama.cpp's llama-convert-llama2c-to-ggml (F32, tok512's vocabulary) and that GGUF converted for ours
(kept F32), so both engines run the same weights. Outputs go under --work-dir (default
~/.cache/dllama_mpi/spec-bench), never into the repository.

Checked: ours' generated text at temperature 0 is byte-identical with and without speculation (every run
against the first --speculate 0 run of the task and rank count); llama.cpp's plain text is a prefix of its
lookup text (lookup may run a few tokens past). Before measuring it waits for an idle machine
(llamacpp_compare.wait_for_idle), and each run records any other process that used the CPU beside it.

    python tools/speculative_bench.py [--repeat 3] [--ranks 1 2] [--speculate 4 8] [--tasks code rewrite chat stories]
        [--json docs/speculative-bench-....json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dllama_mpi.serving.speculation import DEFAULT_DRAFT
from llamacpp_compare import (
    LLAMA_CPP_PYTHON_VERSION,
    busy_processes,
    cpu_model_name,
    cpu_sample,
    default_cache_dir,
    run_in_session,
    wait_for_idle,
)

REPO = Path(__file__).resolve().parents[1]
STORIES_DIR = REPO.parent / "shared" / "models" / "stories260K"  # as tests/conftest.py's STORIES
QWEN_GGUF = Path.home() / ".cache" / "dllama_mpi" / "real-models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
WORK_DIR = Path.home() / ".cache" / "dllama_mpi" / "spec-bench"
IDLE_SECONDS, IDLE_CPU_PCT, IDLE_TIMEOUT_S = 20.0, 10.0, 1800.0  # as tools/llamacpp_compare.py's defaults
OURS, LLAMA = "dllama_mpi", "llama.cpp"
LLAMA_LOOKUP_DEFAULT_DRAFT = 3  # common_params_speculative_draft::n_max in this llama.cpp (common/common.h)
LLAMA_CONTEXT = 4096  # -c and --max-seq-len for the real model: our default KV cache length (the model's is 32768)
STORIES_CONTEXT = 512  # stories260K's seq_len

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def qwen_chat(message: str) -> str:
    """Qwen2.5's chat template for one user message, rendered as text, the assistant's turn opened."""
    return (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
            "<|im_start|>assistant\n")


CODE_PROMPT = '''\
import math
from dataclasses import dataclass


@dataclass
class Vector3:
    """A vector in three dimensions."""

    x: float
    y: float
    z: float

    def __add__(self, other: "Vector3") -> "Vector3":
        return Vector3(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other: "Vector3") -> "Vector3":
        return Vector3(self.x - other.x, self.y - other.y, self.z - other.z)

    def __mul__(self, k: float) -> "Vector3":
        return Vector3(self.x * k, self.y * k, self.z * k)

    def dot(self, other: "Vector3") -> float:
'''

PARAGRAPH = (
    "The distributed memory model lets each process own a part of the data and talk to the others only through "
    "messages. Its simplicty is also its strength: a program that runs on two laptops runs the same way on a "
    "thousand nodes of a cluster, and the programer decides exactly what travels over the network and when. The "
    "price is that every exchange must be planed in advance. A collective operation such as an all-reduce makes "
    "every rank wait for the slowest one, so a single overloaded machine can hold back the hole job. Good "
    "implementations therefore split the work in proportion to each machine's speed, overlap communication with "
    "computation wherever they can, and keep the number of messages in each step small. When these rules are "
    "folowed, adding a machine makes the job faster instead of slower, and the cluster behaves like one large "
    "computer rather than a crowd of small ones that occasionaly agree."
)

TASKS = {
    "code": {"model": "qwen", "prompt": CODE_PROMPT, "steps": 128},
    "rewrite": {"model": "qwen", "prompt": qwen_chat(f"Rewrite the following paragraph, fixing only the spelling: "
                                                     f"{PARAGRAPH}"), "steps": 128},
    # (asked "How does a hash table work, and when would you use one ...?", this model only rephrases the
    # question and stops, after about 20 tokens)
    "chat": {"model": "qwen", "prompt": qwen_chat("What is a hash table?"), "steps": 128},
    # stories260K ends a story with BOS, where ours stops (llama2.c's convention) and llama.cpp goes on:
    # both are told to ignore end-of-generation tokens, so that both make 200
    "stories": {"model": "stories", "prompt": "Once upon a time", "steps": 200, "ignore_eos": True},
}


def log(message: str) -> None:
    print(f"speculative_bench: {message}", file=sys.stderr, flush=True)


# ===================================================================== parsing

_SPEED = re.compile(r"decode: (\d+) tokens(?:, ([0-9.]+) tokens/s)?")
_NUM = r"([0-9.]+|nan|inf|-)"
_SPECULATION = re.compile(
    rf"^speculation: (\d+) tokens in (\d+) steps \({_NUM} a step\), (\d+) drafted, (\d+) accepted "
    rf"\({_NUM}%?\), {_NUM} collective rounds a token", re.M)  # the rate is "-" when nothing was drafted


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_ours(stderr: str) -> dict:
    """Decode tokens and tokens/s from our speed line (the last one), and the `speculation:` line's figures
    (None where it is absent)."""
    speeds = _SPEED.findall(stderr)
    if not speeds:
        raise ValueError("no 'decode: N tokens' speed line in dllama_mpi's stderr")
    tokens, rate = speeds[-1]
    out = {"tokens": int(tokens), "tokens_per_s": float(rate) if rate else None, "steps": None,
           "tokens_per_step": None, "drafted": None, "accepted": None, "acceptance_pct": None,
           "rounds_per_token": None}
    found = _SPECULATION.findall(stderr)
    if found:
        spec_tokens, steps, per_step, drafted, accepted, rate_pct, rounds = found[-1]
        out.update({"spec_tokens": int(spec_tokens), "steps": int(steps), "tokens_per_step": _number(per_step),
                    "drafted": int(drafted), "accepted": int(accepted), "acceptance_pct": _number(rate_pct),
                    "rounds_per_token": _number(rounds)})
    return out


_PERF_EVAL = re.compile(r"common_perf_print:\s+eval time =\s*([0-9.]+) ms /\s*(\d+) runs\s*\(\s*([0-9.]+) ms per "
                        r"token,\s*([0-9.]+) tokens per second\)")
_PERF_PROMPT = re.compile(r"common_perf_print:\s+prompt eval time =\s*([0-9.]+) ms /\s*(\d+) tokens")


def parse_llama_completion(stderr: str) -> dict:
    """llama-completion's decode speed: its "eval time" line (single-token decode calls and their time; the
    first generated token comes from the prompt's evaluation, so tokens = runs + 1)."""
    found = _PERF_EVAL.findall(stderr)
    if not found:
        raise ValueError("no 'common_perf_print: eval time' line in llama-completion's stderr")
    ms, runs, _, rate = found[-1]
    prompt = _PERF_PROMPT.findall(stderr)
    return {"tokens": int(runs) + 1, "tokens_per_s": float(rate), "eval_ms": float(ms), "eval_runs": int(runs),
            "prompt_tokens": int(prompt[-1][1]) if prompt else None, "steps": int(runs) + 1, "tokens_per_step": 1.0,
            "drafted": None, "accepted": None, "acceptance_pct": None, "rounds_per_token": None}


_LOOKUP_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds, speed:\s+([0-9.]+) t/s")


def _stat_line(name: str, stderr: str) -> str:
    found = re.findall(rf"\b{name}\s*=\s*([^\s,%]+)", stderr)
    if not found:
        raise ValueError(f"no '{name} =' line in llama-lookup's stderr")
    return found[-1]


def parse_llama_lookup(stderr: str) -> dict:
    """llama-lookup's statistics (examples/lookup/lookup.cpp): n_predict tokens sampled in the decode loop over
    `decoded ... in T seconds`; its own speed is n_predict / T, ours (generated - 1) / decode time, so the rate
    recorded is (n_predict - 1) / T (its own kept as `tool_tokens_per_s`). Each target step accepts a run of
    drafted tokens then adds one, so steps = n_predict - n_accept."""
    found = _LOOKUP_DECODED.findall(stderr)
    if not found:
        raise ValueError("no 'decoded N tokens in T seconds' line in llama-lookup's stderr")
    n, seconds, tool_rate = found[-1]
    n_predict, seconds = int(n), float(seconds)
    if int(_stat_line("n_predict", stderr)) != n_predict:
        raise ValueError("llama-lookup: n_predict differs from its 'decoded' count")
    drafted, accepted = int(_stat_line("n_drafted", stderr)), int(_stat_line("n_accept", stderr))
    steps = n_predict - accepted
    return {"tokens": n_predict, "tokens_per_s": (n_predict - 1) / seconds if seconds > 0 else None,
            "tool_tokens_per_s": float(tool_rate), "decode_s": seconds, "n_draft": int(_stat_line("n_draft", stderr)),
            "steps": steps, "tokens_per_step": n_predict / steps if steps else None, "drafted": drafted,
            "accepted": accepted, "acceptance_pct": 100.0 * accepted / drafted if drafted else None,
            "rounds_per_token": None}


END_OF_TEXT = " [end of text]\n"  # tools/completion/completion.cpp


def completion_generated(stdout: str) -> str:
    """llama-completion's generated text (--no-display-prompt): its stdout less the blank line it ends with, and
    less the " [end of text]\\n" it prints at an end-of-generation token."""
    text = stdout[:-2] if stdout.endswith("\n\n") else stdout
    return text[:-len(END_OF_TEXT)] if text.endswith(END_OF_TEXT) else text


def ours_generated(stdout: str, prompt: str) -> str:
    """Our generated text: stdout less the echoed prompt (and the final newline rank 0 ends with)."""
    text = stdout[len(prompt):] if stdout.startswith(prompt) else stdout
    return text[:-1] if text.endswith("\n") else text


def lookup_generated(stdout: str, prompt: str) -> str:
    """llama-lookup's generated text: its stdout is "\\n\\n", the prompt's pieces (a BOS among them as "<s> "
    for stories260K's vocabulary), the tokens, then two blank lines."""
    text = stdout[2:] if stdout.startswith("\n\n") else stdout
    start = text.find(prompt)
    if 0 <= start <= 8:
        text = text[start + len(prompt):]
    return text[:-4] if text.endswith("\n\n\n\n") else text


def common_prefix(a: str, b: str) -> int:
    """How many characters two texts share at their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def texts_agree(plain: str, lookup: str) -> bool:
    """llama.cpp's plain text (S tokens) against its lookup text (S or a few more tokens, an end-of-generation
    token printed as text): the plain text, trailing whitespace aside, is where the lookup text starts."""
    return lookup.startswith(plain.rstrip())


# ===================================================================== commands


def ours_command(mpiexec: str, ranks: int, model: Path, prompt: str, steps: int, speculate: int | None,
                 python: str = sys.executable, ignore_eos: bool = False, context: int | None = None) -> list[str]:
    command = [mpiexec, "-n", str(ranks), python, "-m", "dllama_mpi", "--model", str(model), "--prompt", prompt,
               "--steps", str(steps), "--temperature", "0"]
    command += ["--max-seq-len", str(context)] if context else []
    command += ["--ignore-eos"] if ignore_eos else []
    return command + (["--speculate", str(speculate)] if speculate is not None else [])


def llama_completion_command(binary: Path, gguf: Path, prompt: str, steps: int, threads: int,
                             context: int | None, ignore_eos: bool = False) -> list[str]:
    command = [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(steps), "--temp", "0", "-t", str(threads),
               "-no-cnv", "--no-display-prompt", "--seed", "0"]
    command += ["--ignore-eos"] if ignore_eos else []
    return command + (["-c", str(context)] if context else [])


def llama_lookup_command(binary: Path, gguf: Path, prompt: str, steps: int, threads: int, context: int | None,
                         draft: int | None, ignore_eos: bool = False) -> list[str]:
    command = [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(steps - 1), "--temp", "0", "-t", str(threads),
               "--seed", "0"]
    command += ["--ignore-eos"] if ignore_eos else []
    command += ["-c", str(context)] if context else []
    return command + (["--spec-draft-n-max", str(draft)] if draft is not None else [])


def configs(ranks: list[int], speculate: list[int], supported: bool) -> list[tuple[str, str, dict]]:
    """(engine, config name, settings) of one task's runs, in run order."""
    out = [(LLAMA, "plain", {"kind": "completion"}), (LLAMA, "lookup", {"kind": "lookup", "draft": None})]
    out += [(LLAMA, f"lookup K={k}", {"kind": "lookup", "draft": k})
            for k in dict.fromkeys([DEFAULT_DRAFT, *speculate]) if k != LLAMA_LOOKUP_DEFAULT_DRAFT]
    for n in ranks:
        if supported:
            out.append((OURS, f"n{n} off", {"ranks": n, "speculate": 0}))
            out.append((OURS, f"n{n} default", {"ranks": n, "speculate": None}))
            out += [(OURS, f"n{n} K={k}", {"ranks": n, "speculate": k}) for k in speculate]
        else:
            out.append((OURS, f"n{n} no flag", {"ranks": n, "speculate": None}))
    return out


def baseline_config(engine: str, config: str) -> str:
    if engine == LLAMA:
        return "plain"
    ranks = config.split()[0]
    return f"{ranks} off"


def run(command: list[str], timeout: float) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `command`, in a session of its own so that a timeout or Ctrl-C
    ends all of it (mpiexec's ranks too)."""
    t0 = time.monotonic()
    returncode, out, err = run_in_session(command, timeout)
    return returncode, out, err, time.monotonic() - t0


def dry_run_rounds(model: Path, ranks: int, python: str = sys.executable) -> int | None:
    """Collectives per decoded token without speculation, as --dry-run counts them for `ranks` equal budgets
    (0 on one rank); None if it says nothing."""
    if ranks == 1:
        return 0
    out = subprocess.run([python, "-m", "dllama_mpi", "--model", str(model), "--memory-budget", *["1"] * ranks,
                          "--dry-run"], capture_output=True, text=True, cwd=REPO)
    found = re.search(r"per decoded token: (\d+) collectives", out.stdout + out.stderr)
    return int(found.group(1)) if found else None


def speculate_supported(python: str = sys.executable) -> bool:
    out = subprocess.run([python, "-m", "dllama_mpi", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    return "--speculate" in out


# ===================================================================== models and binaries


def llama_binary(build: Path, name: str) -> Path:
    """llama.cpp's `name` from tools/llamacpp_compare.py's build directory, built there if missing (its examples
    switched on: -DLLAMA_BUILD_EXAMPLES=ON, every other flag as configured; the library objects are reused)."""
    binary = build / "bin" / name
    if binary.exists():
        return binary
    if not (build / "CMakeCache.txt").exists():
        sys.exit(f"speculative_bench: no llama.cpp build in {build}: run tools/llamacpp_compare.py once first")
    cache = (build / "CMakeCache.txt").read_text()
    source = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache, re.M)
    if "LLAMA_BUILD_EXAMPLES:BOOL=ON" not in cache and source:
        log(f"configuring {build} with its examples (-DLLAMA_BUILD_EXAMPLES=ON) ...")
        subprocess.run(["cmake", "-S", source.group(1), "-B", str(build), "-DLLAMA_BUILD_EXAMPLES=ON"], check=True,
                       stdout=subprocess.DEVNULL)
    log(f"building {name} ...")
    subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", name, "-j", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def convert_once(source: Path, out: Path, *extra: str) -> Path:
    if not out.exists():
        log(f"converting {source} -> {out} ...")
        tmp = out.with_suffix(".tmp.h5")
        tmp.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "dllama_mpi", "convert", str(source), str(tmp), *extra], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        tmp.replace(out)
    return out


def stories_gguf(build: Path, work: Path, stories_dir: Path) -> Path | None:
    """stories260K as a GGUF by llama.cpp's own converter (F32 weights, tok512's vocabulary); None if the
    llama2.c files are missing."""
    out = work / "stories260K.gguf"
    if out.exists():
        return out
    if not (stories_dir / "stories260K.bin").exists():
        return None
    binary = llama_binary(build, "llama-convert-llama2c-to-ggml")
    subprocess.run([str(binary), "--copy-vocab-from-model", str(stories_dir / "tok512.bin"), "--llama2c-model",
                    str(stories_dir / "stories260K.bin"), "--llama2c-output-model", str(out)], check=True,
                   capture_output=True)
    return out


# ===================================================================== summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, engine, config), in first-run order: median, min, max tokens/s over the rounds, the speedup
    of the medians over the same engine's (and rank count's) no-speculation baseline, and the medians of
    tokens/step, acceptance and rounds/token."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["engine"], r["config"]), []).append(r)
    out = []
    for (task, engine, config), runs in groups.items():
        rates = [r.get("tokens_per_s") for r in runs if r.get("ok")]
        s = {"task": task, "engine": engine, "config": config, "runs": len(runs),
             "failed": sum(not r.get("ok") for r in runs), "tokens_per_s": rates,
             "median_tokens_per_s": _median(rates),
             "min_tokens_per_s": min((v for v in rates if v is not None), default=None),
             "max_tokens_per_s": max((v for v in rates if v is not None), default=None),
             "tokens": _median([r.get("tokens") for r in runs if r.get("ok")])}
        for key in ("tokens_per_step", "acceptance_pct", "rounds_per_token", "drafted", "accepted"):
            s[key] = _median([r.get(key) for r in runs if r.get("ok")])
        same = [r.get("text_identical") for r in runs if r.get("text_identical") is not None]
        s["text_identical"] = all(same) if same else None
        out.append(s)
    by_key = {(s["task"], s["engine"], s["config"]): s for s in out}
    for s in out:
        base = by_key.get((s["task"], s["engine"], baseline_config(s["engine"], s["config"])))
        s["speedup"] = (s["median_tokens_per_s"] / base["median_tokens_per_s"]
                        if base and base is not s and s["median_tokens_per_s"] and base["median_tokens_per_s"] else None)
    return out


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(summary: list[dict]) -> str:
    lines = ["| task | engine, config | tokens | decode tok/s median (min-max) | speedup | tokens/step | acceptance "
             "| rounds/token | text = no speculation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        cell = (f"{_f(s['median_tokens_per_s'])} ({_f(s['min_tokens_per_s'])}-{_f(s['max_tokens_per_s'])})"
                if s["median_tokens_per_s"] is not None else "failed")
        identical = {True: "yes", False: "**NO**", None: "-"}[s["text_identical"]]
        lines.append(f"| {s['task']} | {s['engine']} {s['config']} | {_f(s['tokens'], 0)} | {cell} "
                     f"| {_f(s['speedup'], 2, 'x')} | {_f(s['tokens_per_step'])} | {_f(s['acceptance_pct'], 1, '%')} "
                     f"| {_f(s['rounds_per_token'], 1)} | {identical} |")
    return "\n".join(lines)


def git_commit() -> str:
    """HEAD's commit, "+dirty" when tracked files under dllama_mpi/ differ from it (the engine measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dllama_mpi"],
                               capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ===================================================================== main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/speculative_bench.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default %(default)s); medians reported")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="our mpiexec -n values (default 1 2)")
    p.add_argument("--speculate", type=int, nargs="*", default=[],
                   help="draft lengths K to run besides the default: ours with --speculate K, llama-lookup with "
                        "--spec-draft-n-max K")
    p.add_argument("--steps", type=int, default=None,
                   help="tokens generated for every task (default: 128 a task, 200 for stories)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp's -t (default: cores)")
    p.add_argument("--qwen-gguf", type=Path, default=QWEN_GGUF, help="the real model's GGUF (default: %(default)s)")
    p.add_argument("--stories-dir", type=Path, default=STORIES_DIR,
                   help="stories260K.bin and tok512.bin (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR, help="converted models (default: %(default)s)")
    p.add_argument("--llama-build", type=Path, default=default_cache_dir(LLAMA_CPP_PYTHON_VERSION) / "build",
                   help="llama.cpp's build directory (tools/llamacpp_compare.py's; default: %(default)s)")
    p.add_argument("--no-llama", action="store_true", help="ours only")
    p.add_argument("--json", type=Path, default=None, help="write every run and the summary there")
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    p.add_argument("--idle-cpu", type=float, default=IDLE_CPU_PCT)
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not mpiexec:
        sys.exit("speculative_bench: mpiexec not found next to the Python interpreter or on PATH")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    supported = speculate_supported()
    if not supported:
        log("python -m dllama_mpi --help lists no --speculate: ours runs without the flag only (the baseline)")
    binaries = {} if args.no_llama else {name: llama_binary(args.llama_build, name)
                                         for name in ("llama-completion", "llama-lookup")}
    models: dict[str, dict] = {}
    if any(TASKS[t]["model"] == "qwen" for t in args.tasks):
        models["qwen"] = {"gguf": args.qwen_gguf, "context": LLAMA_CONTEXT,
                          "h5": convert_once(args.qwen_gguf, args.work_dir / (args.qwen_gguf.stem + ".h5"))}
    if "stories" in args.tasks:
        gguf = stories_gguf(args.llama_build, args.work_dir, args.stories_dir)
        if gguf is None:
            sys.exit(f"speculative_bench: stories260K.bin not found in {args.stories_dir}")
        # llama2c-to-ggml writes a context of 128 into the GGUF (stories260K.bin says 512): both are given 512
        models["stories"] = {"gguf": gguf, "context": STORIES_CONTEXT,
                             "h5": convert_once(gguf, args.work_dir / "stories260K-from-gguf.h5")}
    plan = [(c[0], c[1], c[2]) for c in configs(args.ranks, args.speculate, supported)
            if not (args.no_llama and c[0] == LLAMA)]

    idle = wait_for_idle(args.idle_seconds, args.idle_cpu, args.idle_timeout)
    me, ticks = {os.getpid()}, os.sysconf("SC_CLK_TCK")
    rows: list[dict] = []
    reference: dict[tuple[str, str], str] = {}  # (task, ranks): our first no-speculation text
    llama_texts: dict[str, dict[str, str]] = {}
    our_texts: dict[str, str] = {}  # each task's first text of ours
    baseline_rounds = {(name, n): dry_run_rounds(m["h5"], n) for name, m in models.items() for n in args.ranks}
    for i in range(args.repeat):
        for task in args.tasks:
            spec = TASKS[task]
            model, prompt = models[spec["model"]], spec["prompt"]
            steps, ignore_eos = args.steps or spec["steps"], spec.get("ignore_eos", False)
            for engine, config, settings in plan:
                if engine == OURS:
                    command = ours_command(mpiexec, settings["ranks"], model["h5"], prompt, steps, settings["speculate"],
                                           ignore_eos=ignore_eos, context=model["context"])
                elif settings["kind"] == "completion":
                    command = llama_completion_command(binaries["llama-completion"], model["gguf"], prompt, steps,
                                                       args.threads, model["context"], ignore_eos)
                else:
                    command = llama_lookup_command(binaries["llama-lookup"], model["gguf"], prompt, steps,
                                                   args.threads, model["context"], settings["draft"], ignore_eos)
                before = cpu_sample(me)
                code, out, err, seconds = run(command, args.run_timeout)
                others = busy_processes(before, cpu_sample(me), seconds, args.idle_cpu, ticks)
                row = {"round": i, "task": task, "engine": engine, "config": config, "command": command,
                       "seconds": round(seconds, 3), "exit_code": code, "ok": code == 0,
                       "disturbed_by": [f"{name} (pid {pid}) {pct:.0f}%" for pid, name, pct in others]}
                if code:
                    row["stderr_tail"] = err[-3000:]
                    log(f"round {i + 1}/{args.repeat} {task} {engine} {config}: FAILED (exit {code}): {err[-500:]}")
                    rows.append(row)
                    continue
                try:
                    if engine == OURS:
                        row.update(parse_ours(err))
                        if row["rounds_per_token"] is None and (settings["speculate"] == 0 or not supported):
                            row["rounds_per_token"] = baseline_rounds[(spec["model"], settings["ranks"])]
                            row["rounds_from"] = "--dry-run"
                        text = ours_generated(out, prompt)
                        our_texts.setdefault(task, text)
                        key = (task, config.split()[0])
                        if settings["speculate"] == 0 or not supported:
                            reference.setdefault(key, text)
                        row["text_identical"] = text == reference[key] if key in reference else None
                    elif settings["kind"] == "completion":
                        row.update(parse_llama_completion(err))
                        text = completion_generated(out)
                        llama_texts.setdefault(task, {}).setdefault("plain", text)
                    else:
                        row.update(parse_llama_lookup(err))
                        text = lookup_generated(out, prompt)
                        plain = llama_texts.get(task, {}).get("plain")
                        llama_texts.setdefault(task, {}).setdefault(config, text)
                        row["text_identical"] = texts_agree(plain, text) if plain is not None else None
                except ValueError as exc:
                    row.update({"ok": False, "parse_error": str(exc), "stderr_tail": err[-3000:]})
                    log(f"round {i + 1}/{args.repeat} {task} {engine} {config}: {exc}")
                    rows.append(row)
                    continue
                row["text"] = text
                rows.append(row)
                log(f"round {i + 1}/{args.repeat} {task} {engine} {config}: {row['tokens']} tokens, "
                    f"{_f(row['tokens_per_s'])} tok/s, {_f(row.get('tokens_per_step'))} a step, acceptance "
                    f"{_f(row.get('acceptance_pct'), 1, '%')}, {_f(row.get('rounds_per_token'), 1)} rounds/token"
                    + ("" if row.get("text_identical") is not False else "; TEXT DIFFERS")
                    + (f"; disturbed by {', '.join(row['disturbed_by'][:3])}" if others else ""))
    summary = summarize(rows)
    texts = {task: {"ours": our_texts.get(task), **{f"llama.cpp {k}": v for k, v in llama_texts.get(task, {}).items()}}
             for task in args.tasks}
    for t in texts.values():
        if t["ours"] is not None and t.get("llama.cpp plain") is not None:
            t["common_prefix_chars_ours_llama_plain"] = common_prefix(t["ours"], t["llama.cpp plain"])
    disturbed = sum(bool(r["disturbed_by"]) for r in rows)
    facts = {"tool": "tools/speculative_bench.py", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)), "git_commit": git_commit(),
             "speculate_flag": supported, "our_default_draft": DEFAULT_DRAFT,
             "llama_lookup_default_draft": LLAMA_LOOKUP_DEFAULT_DRAFT, "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
             "llama_threads": args.threads, "ranks": args.ranks, "speculate": args.speculate, "repeat": args.repeat,
             "idle": idle, "disturbed_runs": disturbed, "runs": len(rows),
             "models": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in models.items()},
             "tasks": {t: {"prompt": TASKS[t]["prompt"], "steps": args.steps or TASKS[t]["steps"],
                           "ignore_eos": TASKS[t].get("ignore_eos", False)} for t in args.tasks},
             "argv": sys.argv}
    print(f"CPU: {facts['cpu']} ({facts['cores']} cores); {facts['date']}; {args.repeat} interleaved round(s); "
          f"llama.cpp {args.threads} threads; ours threads per rank: the default (cores shared out)"
          + ("" if idle else "; MACHINE NOT IDLE")
          + (f"; {disturbed} of {len(rows)} runs had another process above {args.idle_cpu:g}% CPU beside them"
             if disturbed else "")
          + "; rounds/token without speculation: --dry-run's count; speedup = median / the same engine's (and rank "
            "count's) median without speculation; 'text =': ours, byte-identical to --speculate 0; llama.cpp lookup, "
            "its plain text a prefix of it\n")
    print(markdown_table(summary))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "summary": summary, "texts": texts, "rows": rows}, indent=1)
                             + "\n")
        log(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
