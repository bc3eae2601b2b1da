"""`python tools/serve_bench.py`: the serving numbers users compare between inference servers (output tokens/s
under concurrent streams, time to first token, time per output token) for `python -m dllama_mpi serve`.

For each rank count of --ranks it starts one server (`mpiexec -n R python -m dllama_mpi serve --port 0
--slots S`, equal memory budgets unless --memory-budget gives them), waits until it serves, sends one short
warm-up request, waits until the machine is idle (no other process above 10 % CPU for 20 s; --no-idle-wait
skips it), then runs each --concurrency level C in turn: C client threads, each sending --requests streamed
/v1/completions requests back to back (closed loop). Every request has a prompt of --prompt-tokens random token
ids, new for every request so that no KV prefix is reused, `temperature: 0` and `ignore_eos: true`, so that it
generates exactly --max-tokens tokens however the (often random) weights behave. Then the server gets SIGTERM
(to its process group) and must exit 0.

Per request, on the client's clock (time.perf_counter):
  TTFT  time to first token: from sending the request to the first chunk carrying text;
  TPOT  time per output token: (last token's chunk - first text chunk) / (completion tokens - 1), the last
        token's chunk being the one with the finish reason (sent in the scheduler step that sampled it) and the
        completion tokens those of the usage chunk (stream_options.include_usage).
Per level: output tok/s = all completion tokens / the level's wall time (first send to last finish, so the
tail where fewer than C streams remain counts too), and the 50th and 95th percentiles of TTFT and TPOT
(linear interpolation between order statistics, numpy's default, as vLLM's benchmark_serving reports them).
TTFT includes any wait for a free slot: with C above --slots, requests queue.

With --response-format (an OpenAI response_format object, or @FILE holding one) every level runs twice in turn,
without and with that response_format (with it first in every other round), --rounds times, and the answer ends
where the model (or its format) ends it, at most --max-tokens tokens (the API refuses ignore_eos with a format, so
neither run asks for it); with --chat-prompt each request is a chat request instead (one user message: the prompt
after a random number, so that no two share more than the chat template's opening). A table of the medians over
the rounds gives each level's ms per token per stream with and without the format, and rank 0's mask work per
token, replayed here on the formatted answers with the server's own code (dllama_mpi.serving.constraints over the
model's vocabulary: the mask and the advance).

    python tools/serve_bench.py --shape tinyllama-1.1b --ranks 1 2 --concurrency 1 2 4 8 --json serve.json
    python tools/serve_bench.py --model model.h5 --memory-budget 3 1 --prompt-tokens 128 --max-tokens 32
    python tools/serve_bench.py --model qwen.h5 --concurrency 1 8 --rounds 3 --response-format @schema.json

Not run in CI (a real shape takes minutes); tests/test_serve_bench.py runs it end to end on stories260K.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2

from constrained_bench import without_dummy_prefix
from dllama_mpi.commands.launcher import positive_int
from llamacpp_compare import cpu_model_name, wait_for_idle

# Prompt ids start here: every id costs the same to embed and attend to, so random ids measure what real text would;
# 0-2 are <unk>, BOS and EOS in llama2.c-style vocabularies, left out so that a prompt holds ordinary tokens
FIRST_TOKEN_ID = 3
IDLE_SECONDS, IDLE_CPU_PCT, IDLE_TIMEOUT_S = 20.0, 10.0, 1800.0  # as tools/llamacpp_compare.py's defaults
START_TIMEOUT_S = 600.0  # loading a large model under mpiexec
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 3600.0  # a request queued behind many long ones
WARMUP_TOKENS = 4
SEED = 0
CHAT_PROMPT = ("List 40 fruits, each with its colour and a one-sentence description, as JSON: "
               '{"fruits": [{"name": ..., "colour": ..., "description": ...}, ...]}')


def log(message: str) -> None:
    print(f"serve_bench: {message}", file=sys.stderr, flush=True)


# ===================================================================== statistics and the table


def percentile(values: list[float], pct: float) -> float:
    """The `pct` percentile (0-100) by linear interpolation between order statistics (numpy's default method,
    Hyndman and Fan's type 7): rank h = (n - 1) * pct / 100 in the sorted values, interpolated between the
    values at floor(h) and ceil(h). One value is every percentile of itself."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    h = (len(ordered) - 1) * pct / 100
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


@dataclass
class Measured:
    """One request, times in seconds from the client's clock."""

    ttft_s: float
    tpot_s: float | None  # None with a single completion token
    latency_s: float  # sending to [DONE]
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from a slot's KV cache (0 unless prompts repeat)
    completion_tokens: int
    sent: float  # perf_counter at sending
    done: float  # perf_counter at [DONE]
    text: str = ""  # the answer (kept with --response-format: its mask work is replayed on it)


def level_row(streams: int, measured: list[Measured]) -> dict:
    """A level's summary: aggregate output tok/s over its wall time, TTFT and TPOT percentiles in ms."""
    wall = max(m.done for m in measured) - min(m.sent for m in measured)
    ttft = [m.ttft_s * 1e3 for m in measured]
    tpot = [m.tpot_s * 1e3 for m in measured if m.tpot_s is not None]
    return {
        "streams": streams,
        "requests": len(measured),
        "wall_s": wall,
        "output_tok_s": sum(m.completion_tokens for m in measured) / wall,
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p95": percentile(ttft, 95),
        "tpot_ms_p50": percentile(tpot, 50) if tpot else None,
        "tpot_ms_p95": percentile(tpot, 95) if tpot else None,
        "per_request": [asdict(m) for m in measured],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| streams | output tok/s | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 | requests |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [str(r["streams"]), f"{r['output_tok_s']:.1f}",
                 *(_ms(r[k]) for k in ("ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "tpot_ms_p95")), str(r["requests"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_line(rows: list[dict]) -> str:
    """The aggregate tok/s at the highest concurrency against the lowest (1 stream when measured)."""
    low, high = min(rows, key=lambda r: r["streams"]), max(rows, key=lambda r: r["streams"])
    return (f"{_streams(high['streams'])}: {high['output_tok_s'] / low['output_tok_s']:.2f}x the output tok/s of "
            f"{_streams(low['streams'])}")


def _streams(n: int) -> str:
    return f"{n} stream{'s' * (n != 1)}"


def report(ranks: int, budgets: list[str] | None, slots: int, rows: list[dict]) -> str:
    """A rank count's table with a line above (the setup) and below (the scaling); `rows` carry `idle`."""
    head = (f"{ranks} rank(s), memory budgets {' '.join(budgets) if budgets else 'equal'}, {slots} slots; "
            f"TTFT and TPOT in ms{'; MACHINE NOT IDLE (the numbers may be low)' if rows[0]['idle'] is False else ''}")
    return f"{head}\n\n{markdown_table(rows)}\n\n{scaling_line(rows)}"


# ===================================================================== the server


class ServeJob:
    """`mpiexec -n R python -m dllama_mpi serve` in a session of its own; `url` once it says it is serving."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.log: deque[str] = deque(maxlen=200)
        self.url: str | None = None
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if m := re.search(r"serving \S+ at (http://\S+)/v1", line):
                self.url = m.group(1)
                self._serving.set()
        self._serving.set()  # it ended without serving

    def wait_serving(self, timeout: float) -> str:
        if not self._serving.wait(timeout) or self.url is None:
            raise RuntimeError(f"the server did not start within {timeout:g} s:\n{self.tail()}")
        return self.url

    def tail(self) -> str:
        return "".join(self.log)

    def stop(self, timeout: float) -> int:
        """SIGTERM to the process group; its exit code (the group is killed if it outlives `timeout`)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the server did not stop within {timeout:g} s of SIGTERM:\n{self.tail()}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def serve_command(mpiexec: str, ranks: int, model: Path, slots: int, budgets: list[str] | None) -> list[str]:
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "dllama_mpi", "serve", "--model", str(model),
               "--port", "0", "--slots", str(slots)]
    return command + (["--memory-budget", *budgets] if budgets else [])


# ===================================================================== the clients


def prompt_vocabulary(model: Path) -> int:
    """Prompt ids are drawn from [FIRST_TOKEN_ID, this): the smaller of the model's vocabulary (its embedding
    rows) and its tokenizer's (the API refuses ids past the tokenizer; a padded model vocabulary has more rows)."""
    from dllama_mpi.files.modelfile import open_model

    model_file = open_model(model)
    try:
        return min(model_file.spec.vocab_size, model_file.tokenizer().vocab_size)
    finally:
        model_file.close()


class Prompts:
    """Random prompts, thread-safe; two prompts share their first token with probability 1 / the vocabulary, so the
    scheduler's prefix reuse has (almost) nothing to reuse: every request prefills its whole prompt."""

    def __init__(self, length: int, vocabulary: int, seed: int = SEED) -> None:
        self.length, self.vocabulary = length, vocabulary
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def next(self) -> list[int]:
        with self._lock:
            return [self._rng.randrange(FIRST_TOKEN_ID, self.vocabulary) for _ in range(self.length)]


@dataclass(frozen=True)
class Shape:
    """What each request is: a /v1/completions request of random ids, or with `chat` a /v1/chat/completions
    request of that user message; formatted by `response_format` if given; run to exactly `max_tokens` with
    `ignore_eos`."""

    max_tokens: int
    chat: str | None = None
    response_format: dict | None = None
    ignore_eos: bool = True

    def request(self, prompt: list[int]) -> tuple[str, dict]:
        """(path, body) for one request, `prompt` its random ids (in a chat request, the first as a number)."""
        body = {"max_tokens": self.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        body |= {"ignore_eos": True} if self.ignore_eos else {}
        body |= {"response_format": self.response_format} if self.response_format else {}
        if self.chat is None:
            return "/v1/completions", {"prompt": prompt, **body}
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Request {prompt[0]}. {self.chat}"}], **body}


def stream_completion(client: httpx2.Client, prompt: list[int], shape: Shape) -> Measured:
    """One streamed request, timed chunk by chunk."""
    path, body = shape.request(prompt)
    first = last = usage = None
    text: list[str] = []
    sent = time.perf_counter()
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            now, data = time.perf_counter(), line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream ended in an error: {chunk['error']['message']}")
            choice = chunk["choices"][0] if chunk["choices"] else {}
            piece = choice.get("text") or (choice.get("delta") or {}).get("content")
            if piece:
                first = first or now
                text.append(piece)
            if choice.get("finish_reason"):
                last = now
            usage = chunk.get("usage") or usage
    done = time.perf_counter()
    if first is None or last is None or usage is None:
        raise RuntimeError(f"incomplete stream (text: {first is not None}, finish: {last is not None}, "
                           f"usage: {usage is not None})")
    n = usage["completion_tokens"]
    if shape.ignore_eos and n != shape.max_tokens:
        raise RuntimeError(f"{n} completion tokens of the {shape.max_tokens} asked (is the context too short?)")
    return Measured(ttft_s=first - sent, tpot_s=(last - first) / (n - 1) if n > 1 else None, latency_s=done - sent,
                    prompt_tokens=usage["prompt_tokens"], cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                    completion_tokens=n, sent=sent, done=done, text="".join(text) if shape.response_format else "")


def run_level(url: str, streams: int, per_stream: int, prompts: Prompts, shape: Shape) -> list[Measured]:
    """`streams` threads, each sending `per_stream` requests back to back; every request's measurement."""
    measured: list[Measured] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop() -> None:
        try:
            with httpx2.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
                for _ in range(per_stream):
                    m = stream_completion(client, prompts.next(), shape)
                    with lock:
                        measured.append(m)
        except Exception as exc:  # raised again on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, name=f"stream-{i}") for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed; the first: {errors[0]}") from errors[0]
    return measured


def requests_per_stream(streams: int, given: int | None) -> int:
    """--requests, or by default max(2, 8 // streams): every stream sends at least 2 requests back to back (so
    that each finds the others mid-request, not only all starting together), and every level at least 8 in all."""
    return given if given is not None else max(2, 8 // streams)


# ===================================================================== main


def shapes(args) -> list[Shape]:
    """The requests each level runs in turn: one shape, or two without and with --response-format."""
    if args.response_format is None:
        return [Shape(args.max_tokens, args.chat_prompt)]
    return [Shape(args.max_tokens, args.chat_prompt, None, False),
            Shape(args.max_tokens, args.chat_prompt, args.response_format, False)]


def format_name(shape: Shape) -> str:
    return shape.response_format["type"] if shape.response_format else "text"


def bench_ranks(args, mpiexec: str, model: Path, ranks: int, prompts: Prompts) -> list[dict]:
    """One server of `ranks` ranks through every concurrency level (each shape in turn, --rounds times): a row per
    level, shape and round."""
    command = serve_command(mpiexec, ranks, model, args.slots, args.memory_budget)
    log(f"starting {shlex.join(command)}")
    job = ServeJob(command)
    try:
        url = job.wait_serving(START_TIMEOUT_S)
        with httpx2.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            for shape in shapes(args):
                stream_completion(client, prompts.next(), Shape(min(WARMUP_TOKENS, args.max_tokens), shape.chat,
                                                                shape.response_format, shape.ignore_eos))
        idle = None if args.no_idle_wait else wait_for_idle(IDLE_SECONDS, IDLE_CPU_PCT, IDLE_TIMEOUT_S)
        levels = []
        for r in range(args.rounds):
            for streams in args.concurrency:
                per_stream = requests_per_stream(streams, args.requests)
                for shape in shapes(args)[:: 1 if r % 2 == 0 else -1]:  # ABBA: neither goes first every time
                    log(f"{ranks} rank(s), round {r + 1}: {streams} stream(s) x {per_stream} request(s), "
                        f"{format_name(shape)}")
                    found = run_level(url, streams, per_stream, prompts, shape)
                    levels.append({"round": r + 1, "format": format_name(shape), **level_row(streams, found)})
    except BaseException:
        job.kill()
        raise
    code = job.stop(STOP_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"the server exited {code} after SIGTERM:\n{job.tail()}")
    facts = {"ranks": ranks, "budgets": args.memory_budget, "idle": idle, "server_command": shlex.join(command),
             "server_exit_code": code}
    return [{**facts, **level} for level in levels]


def format_rows(rows: list[dict]) -> list[dict]:
    """Per rank count, streams and format, the medians over the rounds: ms per token per stream (each round's TPOT
    p50), output tok/s and tokens per answer."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["ranks"], r["streams"], r["format"]), []).append(r)
    out = []
    for (ranks, streams, form), found in groups.items():
        answers = [m["completion_tokens"] for r in found for m in r["per_request"]]
        out.append({"ranks": ranks, "streams": streams, "format": form, "rounds": len(found),
                    "tpot_ms": percentile([r["tpot_ms_p50"] for r in found if r["tpot_ms_p50"] is not None], 50),
                    "output_tok_s": percentile([r["output_tok_s"] for r in found], 50),
                    "tokens_per_answer": sum(answers) / len(answers)})
    return out


def format_table(medians: list[dict]) -> str:
    """The medians with each formatted row's cost per token over the same level's text row."""
    text = {(m["ranks"], m["streams"]): m["tpot_ms"] for m in medians if m["format"] == "text"}
    lines = ["| ranks | streams | format | ms per token per stream | + ms per token | output tok/s | tokens per answer |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for m in medians:
        base = text.get((m["ranks"], m["streams"]))
        extra = "-" if m["format"] == "text" or base is None else f"{m['tpot_ms'] - base:+.1f}"
        lines.append(f"| {m['ranks']} | {m['streams']} | {m['format']} | {m['tpot_ms']:.1f} | {extra} | "
                     f"{m['output_tok_s']:.1f} | {m['tokens_per_answer']:.0f} |")
    return "\n".join(lines)


def mask_work(model: Path, response_format: dict, answers: list[str]) -> dict:
    """Rank 0's work per token for `response_format` (the mask over the logits and the advance), replayed on
    `answers` with the server's own classes over the model's vocabulary: the 50th and 95th percentiles in µs."""
    import numpy as np

    from dllama_mpi.files.modelfile import open_model
    from dllama_mpi.serving.constraints import Grammar, Grammars

    model_file = open_model(model)
    try:
        tokenizer, vocab_size = model_file.tokenizer(), model_file.spec.vocab_size
    finally:
        model_file.close()
    grammars = Grammars(tokenizer, vocab_size, tuple(sorted(set(tokenizer.eos_ids))))
    tokenizer = without_dummy_prefix(tokenizer)  # an answer's text, as generated: no SentencePiece space before it
    grammar = (Grammar.json_schema(response_format["json_schema"]["schema"]) if response_format["type"] == "json_schema"
               else Grammar.json_object())
    logits = np.zeros(vocab_size, np.float32)
    times = []
    for answer in answers:
        constraint = grammars.compile(grammar)
        for token in tokenizer.encode(answer, bos=False, special=False):
            t0 = time.perf_counter()
            constraint.mask(logits)
            constraint.advance(token)
            times.append((time.perf_counter() - t0) * 1e6)
    return {"tokens": len(times), "us_p50": percentile(times, 50), "us_p95": percentile(times, 95),
            "setup_s": grammars.setup_s}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/serve_bench.py", allow_abbrev=False,
        description="Serve a model with `python -m dllama_mpi serve` under mpiexec and measure output tok/s, time to first "
                    "token and time per output token under concurrent streamed requests; one markdown table per rank count.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="model file (.h5) or shard directory")
    which.add_argument("--shape", help="a random-weight model of this shape (dllama_mpi.commands.bench's shapes, such as "
                                       "tinyllama-1.1b), written once into ~/.cache/dllama_mpi")
    p.add_argument("--ranks", type=positive_int, nargs="+", help="rank counts, one server each (default: 1, or the number "
                                                              "of --memory-budget values)")
    p.add_argument("--memory-budget", nargs="+", metavar="B",
                   help="the server's budgets, one per rank (then --ranks may only be their count; default: equal)")
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="concurrent streams per level (default: %(default)s)")
    p.add_argument("--requests", type=positive_int,
                   help="requests per stream at every level (default: max(2, 8 // streams))")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=64,
                   help="tokens generated per request, exactly (ignore_eos) (default: %(default)s)")
    p.add_argument("--slots", type=positive_int, default=8, help="the server's --slots (default: %(default)s)")
    p.add_argument("--response-format", type=response_format, metavar="JSON",
                   help="an OpenAI response_format object (or @FILE holding one): chat requests, each level without and "
                        "with it in turn")
    p.add_argument("--chat-prompt", nargs="?", const=CHAT_PROMPT, metavar="TEXT",
                   help="chat requests of this user message (alone: a list of 40 fruits as JSON) instead of completions "
                        "of random ids")
    p.add_argument("--rounds", type=positive_int, default=1, help="times through every level (default: %(default)s)")
    p.add_argument("--no-idle-wait", action="store_true", help="measure without waiting for an idle machine")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every row, per-request times and the facts to FILE")
    return p


def response_format(value: str) -> dict:
    """--response-format's JSON text, or @FILE's."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        found = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a response_format object as JSON, found {text[:80]!r} ({e})") from None
    if not isinstance(found, dict) or found.get("type") not in ("json_object", "json_schema"):
        raise argparse.ArgumentTypeError(f'expected {{"type": "json_object"}} or {{"type": "json_schema", "json_schema": '
                                         f'{{"name": ..., "schema": {{...}}}}}}, found {text[:80]!r}')
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.memory_budget:
        if args.ranks is None:
            args.ranks = [len(args.memory_budget)]
        elif args.ranks != [len(args.memory_budget)]:
            p.error(f"--memory-budget gives {len(args.memory_budget)} ranks: --ranks may only be {len(args.memory_budget)}")
    args.ranks = args.ranks or [1]
    return args


def model_path(args) -> Path:
    if args.model is not None:
        return args.model
    from dllama_mpi.commands.bench import SHAPES, bench_model_path

    if args.shape not in SHAPES:
        sys.exit(f"serve_bench: unknown --shape {args.shape!r}; choose from {', '.join(sorted(SHAPES))}")
    return bench_model_path(args.shape)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not mpiexec:
        sys.exit("serve_bench: mpiexec not found next to the Python interpreter or on PATH")
    model = model_path(args)
    prompts = Prompts(args.prompt_tokens, prompt_vocabulary(model))
    rows = []
    for ranks in args.ranks:
        rows += (found := bench_ranks(args, mpiexec, model, ranks, prompts))
        plain = [r for r in found if r["format"] == "text" and r["round"] == 1]
        print(report(ranks, args.memory_budget, args.slots, plain) + "\n", flush=True)
    medians, work = None, None
    if args.response_format is not None:
        medians = format_rows(rows)
        answers = [m["text"] for r in rows if r["format"] != "text" for m in r["per_request"]]
        work = mask_work(model, args.response_format, answers)
        print(format_table(medians) + f"\n\nrank 0's mask work (replayed on the {len(answers)} formatted answers, "
              f"{work['tokens']} tokens): {work['us_p50']:.0f} µs per token per stream (p95 {work['us_p95']:.0f} µs)",
              flush=True)
    if args.json:
        facts = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model_name(),
                 "cores": len(os.sched_getaffinity(0)), "command": shlex.join([sys.executable, *sys.argv]),
                 "model": str(model), "slots": args.slots, "prompt_tokens": args.prompt_tokens,
                 "max_tokens": args.max_tokens, "rounds": args.rounds, "response_format": args.response_format,
                 "chat_prompt": args.chat_prompt}
        args.json.write_text(json.dumps({"facts": facts, "rows": rows, "format_medians": medians, "mask_work": work},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
