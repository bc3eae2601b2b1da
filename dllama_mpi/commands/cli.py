"""`python -m dllama_mpi`: the commands, argument parsing, up-front validation, generation.

Rank 0 owns the terminal: generated text on stdout, plan and statistics on stderr. Other
ranks speak only through a rank-prefixed logger.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

from ..errors import InputError, UsageError
from ..model import quant
from ..parallel.mpi_runtime import launch_from_env
from ..serving.speculation import DEFAULT_DRAFT, MAX_DRAFT
from .launcher import Parser, add_job_options, parse_args, parse_budgets, run_alone, run_job


def finite_float(text: str) -> float:
    """argparse type: a float that is a number (nan and inf would pass float())."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number such as 0.8, got {text!r}")
    return value


DEFAULT_MAX_QUEUE = 64  # serve: requests waiting for a slot at most (the reasons are in --max-queue's help)

COMMANDS = {
    "serve": "serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...)",
    "chat": "an interactive chat on rank 0's terminal, with the model's chat template",
}
PROGRAMS = {  # commands with options of their own: name -> (module with main(argv), what it does)
    "bench": ("dllama_mpi.commands.bench", "decode and prefill speed on random weights of real shapes, or of --model"),
    "perplexity": ("dllama_mpi.commands.perplexity", "perplexity of a text, and KL divergence against saved logits"),
    "which-mpi": ("dllama_mpi.commands.which_mpi", "which MPI a job started here would use (library, launcher, "
                                                   "runtime wheels), without starting MPI"),
    "convert": ("dllama_mpi.files.convert", "convert an HF, GGUF, distributed-llama or llama2.c model to HDF5 "
                                            "(also installed as dllama-mpi-convert)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The options of `python -m dllama_mpi` (one prompt, then exit) or of one of COMMANDS."""
    # no abbreviations: `--dry` must not start a real run (--dry-run is recognised before parsing)
    prog = "python -m dllama_mpi" + (f" {command}" if command else "")
    description = (COMMANDS[command] + ". " if command else "") + (
        "Distributed Llama inference: each MPI rank holds and computes a share of every layer "
        "proportional to its --memory-budget. Launch with mpirun -n N.")
    epilog = None if command else "commands: " + "; ".join(
        [f"{c}: {d}" for c, d in COMMANDS.items()] + [f"{c}: {d}" for c, (_, d) in PROGRAMS.items()]) + \
        " (python -m dllama_mpi COMMAND --help)"
    p = Parser(prog=prog, allow_abbrev=False, description=description, epilog=epilog)
    add_job_options(p, model_default="a built-in synthetic model")
    p.add_argument("--max-seq-len", type=int, help="KV cache length in tokens (default: the model's seq_len, at most 4096)")
    if command is None:
        p.add_argument("--prompt", help="text to start from (default: just BOS)")
        p.add_argument("--steps", type=int, default=64,
                       help="new tokens at most (default 64); fewer at an end-of-generation token or the end of the context")
    elif command == "chat":
        p.add_argument("--system", help="a system message that starts every conversation")
        p.add_argument("--steps", type=int, help="new tokens per answer at most (default: up to the end of the context)")
    if command in (None, "chat"):
        p.add_argument("--temperature", type=finite_float, default=0.0,
                       help="0 is greedy (default 0); above 0, sampling with --top-p")
        p.add_argument("--top-p", type=finite_float, default=0.9, help="nucleus sampling mass (default 0.9)")
        p.add_argument("--seed", type=int, help="sampling seed (default: from the clock" +
                       (", printed at the end when sampling)" if command is None else ")"))
    if command == "serve":
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
        p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
        p.add_argument("--slots", type=int, default=4,
                       help="sequences decoded together, each with its own KV cache of --max-seq-len tokens (default 4); "
                            "more requests wait in a queue")
        p.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"requests waiting for a slot at most; one more is answered 429 with Retry-After at once "
                            f"(default {DEFAULT_MAX_QUEUE}: a client's batch of concurrent requests fits, and a flood "
                            "meets this 429, which says what to do, well before the limit on open connections, whose next "
                            "is refused with 503; 0: none wait)")
        p.add_argument("--queue-timeout", type=finite_float, metavar="S",
                       help="a request given no slot within S seconds of arriving is answered 429 (default: it waits: "
                            "--max-queue bounds the wait already, and a client that stops waiting cancels its request)")
        p.add_argument("--api-key", default=os.environ.get("DLLAMA_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every request (default: $DLLAMA_API_KEY; none: open)")
        p.add_argument("--model-name", help="the model's name in the API (default: the model file's name)")
    p.add_argument("--speculate", type=non_negative_int, default=DEFAULT_DRAFT, metavar="N",
                   help=f"speculative decoding: each step verifies up to N drafted tokens of each sequence at once (the "
                        f"collectives of one), keeping those the model agrees with: the text is the model's own, greedy "
                        f"or sampled (default {DEFAULT_DRAFT}; 0: off). Drafts come from the prompt and the text so far "
                        "(n-gram lookup: where nothing matches a step has no drafts), or from --draft-model")
    p.add_argument("--draft-min", type=non_negative_int, default=0, metavar="K",
                   help="the fewest drafts a step verifies per sequence wherever that many can be drafted (as "
                        "llama.cpp's --draft-min; default 0: as many as pay, from this job's own step times and the "
                        "drafts kept so far); at most --speculate")
    p.add_argument("--draft-model", metavar="FILE",
                   help="a smaller model of the same vocabulary (a .h5 file) that drafts the tokens, on rank 0 alone; "
                        "default: prompt lookup")
    if command is None:
        p.add_argument("--ignore-eos", action="store_true",
                       help="do not stop at the model's end-of-generation tokens (EOS and the like; BOS for llama2.c models)")
    if command in (None, "serve"):
        p.add_argument("--dry-run", action="store_true",
                       help="as one process without mpirun: print the plan for --memory-budget (one value per rank "
                            "of the job to size), the bytes per token on the wire and each rank's memory, then exit; "
                            "reads only the model's attributes")
    return p


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return int(text)


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    return (argv[0], argv[1:]) if argv and argv[0] in COMMANDS else (None, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PROGRAMS:
        return importlib.import_module(PROGRAMS[argv[0]][0]).main(argv[1:])
    if "--dry-run" in argv and split_command(argv)[0] != "chat":  # decided before MPI starts: one process without it
        return run_alone(lambda: _dry_run(argv))
    return run_job(lambda comm: _run(comm, argv))


def _parse(comm, argv):
    command, argv = split_command(argv)
    args = parse_args(build_parser(command), argv, 0 if comm is None else comm.rank)
    args.command = command
    problems = []
    if getattr(args, "steps", None) is not None and args.steps < 0:
        problems.append(f"--steps must be >= 0, got {args.steps}")
    if getattr(args, "temperature", 0) < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1) <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if command == "serve":
        if not 0 <= args.port <= 65535:
            problems.append(f"--port must be in 0..65535, got {args.port}")
        if args.slots <= 0:
            problems.append(f"--slots must be positive, got {args.slots}")
        if args.queue_timeout is not None and args.queue_timeout <= 0:
            problems.append(f"--queue-timeout must be positive seconds, got {args.queue_timeout:g}; leave it out to wait "
                            "without a limit")
        if args.api_key == "":
            problems.append("--api-key is empty; give a key, or leave it out for an open server")
        elif args.api_key is not None and not re.fullmatch(r"[!-~]+", args.api_key):  # the key itself is not shown: a secret
            problems.append(f"--api-key (or $DLLAMA_API_KEY) holds spaces or characters other than printable ASCII "
                            f"({len(args.api_key)} characters), which no client can send in an Authorization header "
                            "to match it; give the key alone")
    if command == "chat" and args.system is not None:
        _check_utf8(args.system, "the --system text", problems)
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        problems.append(f"--max-seq-len must be positive, got {args.max_seq_len}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "speculate", 0) > MAX_DRAFT:
        problems.append(f"--speculate must be at most {MAX_DRAFT} (a step's rows are 64), got {args.speculate}")
    if getattr(args, "draft_min", 0) > getattr(args, "speculate", 0):
        problems.append(f"--draft-min {args.draft_min} is more than --speculate {args.speculate}, the most drafts a step "
                        "verifies; lower --draft-min or raise --speculate")
    if getattr(args, "draft_model", None) is not None and args.speculate == 0:
        problems.append("--draft-model drafts tokens for speculation, which --speculate 0 turns off; give --speculate N "
                        "(N > 0) or leave out --draft-model")
    if getattr(args, "draft_model", None) is not None and not Path(args.draft_model).is_file():
        problems.append(f"--draft-model {args.draft_model}: no such file; give a model file (.h5) made by dllama-mpi-convert")
    if args.model == "":
        problems.append("--model is empty; give a model file or a shard directory, or leave --model out")
    if getattr(args, "prompt", None) == "":
        problems.append("the prompt is empty; give some text, or leave out --prompt to start from BOS alone")
    elif getattr(args, "prompt", None) is not None:
        _check_utf8(args.prompt, "the prompt", problems)
    if problems:
        raise UsageError("; ".join(problems))
    return args


def _check_utf8(text: str, what: str, problems: list[str]) -> None:
    from ..serving.request import check_utf8

    try:
        check_utf8(text, what, "give it in UTF-8 (e.g. iconv -t UTF-8)")
    except InputError as exc:
        problems.append(str(exc))


def _run(comm, argv) -> int:
    from ..job.loading import SaidIfSlow, open_job
    from ..kernels import qmatmul
    from ..parallel import mpi_runtime, threads
    from ..parallel.comm import library
    from ..serving.request import Sampling
    from ..serving.scheduler import generate
    from ..serving.speculation import logit_rows, open_draft_model

    t_launch = time.perf_counter()
    args = _parse(comm, argv)
    budgets = parse_budgets(args.memory_budget, comm.size)
    n_threads = threads.for_rank(comm.local_rank, comm.local_size, args.nthreads)
    if args.nthreads is not None:  # numba runs at most as many threads as the node has cores
        counts = comm.gather_obj(n_threads)
        if comm.rank == 0 and min(counts) < args.nthreads:
            print(f"note: --nthreads {args.nthreads} is more than this node's cores allow; threads per rank: "
                  f"{' '.join(map(str, counts))}", file=sys.stderr)
    if comm.rank == 0 and args.model is None:
        print("note: no --model given: running the built-in synthetic model. Its weights are random, "
              "so its text is meaningless; convert a real model with dllama-mpi-convert and pass --model.",
              file=sys.stderr)

    def announce(launch):
        plan = launch.plan
        for note in launch.notes:
            print(f"note: {note}", file=sys.stderr)
        kv = f"{launch.n_slots} slots x {launch.max_seq_len}" if launch.n_slots > 1 else f"{launch.max_seq_len}"
        given = " ".join(args.memory_budget or ["1"] * comm.size)
        if budgets.auto:
            given += f" -> {' '.join(map(str, plan.budgets))}"
        print(f"plan {plan.plan_hash()}: {comm.size} rank(s), budgets {given}, "
              f"weights {plan.spec.weights_text}, buffers {args.buffer_float_type}, KV cache {kv} tokens in {launch.kv_type}, "
              f"kernels {qmatmul.ISA}",
              file=sys.stderr)
        print(plan.table(launch.max_seq_len, launch.n_slots, launch.kv_type), file=sys.stderr)
        print("processes: " + ", ".join(f"rank {r} = {host}:{pid}" for r, (host, pid) in enumerate(zip(comm.hosts, comm.pids))),
              file=sys.stderr)
        print(f"MPI: {comm.mpi_run()['text']}", file=sys.stderr)
        shadowed = mpi_runtime.shadowing(mpi_runtime.installed_runtimes(), library())
        if shadowed:
            print(f"note: {shadowed}", file=sys.stderr)

    if args.command == "serve":
        from .serve import serve

        return serve(comm, args, budgets, announce)
    if args.command == "chat":
        from .chat import chat

        return chat(comm, args, budgets, announce)
    prompt_ids = []  # rank 0: the prompt's ids, checked before anything is loaded
    job = open_job(comm, args.model, budgets, max_seq_len=args.max_seq_len, buffer_type=args.buffer_float_type,
                   kv_type=args.kv_type, max_logits=logit_rows(1, args.speculate),
                   check=lambda tokenizer, launch: check(tokenizer, launch, args, prompt_ids), announce=announce)
    draft = open_draft_model(comm, args.draft_model, job, args.speculate, args.kv_type) if args.draft_model else None
    seed = args.seed if args.seed is not None else int(time.time()) % 2**31
    comm.barrier()
    startup_s = time.perf_counter() - t_launch
    prefill = SaidIfSlow(f"processing the prompt ({len(prompt_ids)} tokens)", comm.rank == 0 and args.steps > 0)

    started = []

    def on_text(text: str) -> None:  # rank 0
        if not started:  # the first text: the prompt is processed
            started.append(True)
            prefill.done()
            sys.stdout.write(args.prompt or "")  # the prompt as typed, whatever the tokenizer added to it (BOS) or not
        sys.stdout.write(text)
        sys.stdout.flush()

    with prefill:
        result = generate(job, prompt_ids if comm.rank == 0 else None, args.steps,
                          Sampling(args.temperature, args.top_p, seed), stop_ids=() if args.ignore_eos else None,
                          on_text=on_text, max_draft=args.speculate, draft=draft, min_draft=args.draft_min)
    if comm.rank == 0:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if comm.rank == 0 and result["hit_context"]:
        print(f"note: stopped after {len(result['generated'])} new tokens at the end of the context "
              f"({job.engine.max_seq_len} tokens); raise --max-seq-len for longer output", file=sys.stderr)
    _report(comm, job, result, n_threads, seed if args.temperature > 0 else None, startup_s, budgets)
    return 0


def check(tokenizer, launch, args, prompt_ids: list[int]) -> None:
    """Rank 0, before loading: the prompt's ids into prompt_ids, the draft model's vocabulary."""
    from ..serving.speculation import check_draft_model

    prompt_ids.extend(prompt_tokens(tokenizer, launch, args.prompt or ""))
    if args.draft_model:
        check_draft_model(args.draft_model, tokenizer)


def prompt_tokens(tokenizer, launch, prompt: str) -> list[int]:
    """The prompt's ids, or InputError when they can't fit the context (refused before the
    encoding work where that is known without it, as the API does)."""
    from ..serving.request import check_prompt_length, check_prompt_text

    fit = (launch.max_seq_len, f"shorten the prompt or raise --max-seq-len (model trained for {launch.plan.spec.seq_len})",
           "the context (--max-seq-len)")
    check_prompt_text(tokenizer, prompt, *fit)
    ids = tokenizer.encode(prompt, bos=True, special=True)  # special-token text is those tokens, as in the API
    if not ids:
        raise InputError("the prompt is empty and this model's tokenizer adds no BOS token; give --prompt TEXT")
    check_prompt_length(len(ids), *fit)
    return ids


def speed_text(prompt_tokens: int, cached_tokens: int, prompt_s: float | None, generated: int,
               decode_s: float) -> str:
    """One request's speed, each figure with what it counts: the prompt's tokens computed (not
    taken from a slot's cache) over the time from submission to the first token, then the
    tokens after the first over the time from the first to the last. No rate for zero tokens:
    it would be noise or nan."""
    computed = prompt_tokens - cached_tokens
    text = f"prompt: {computed} new tokens ({cached_tokens} cached)" if cached_tokens else f"prompt: {prompt_tokens} tokens"
    if computed and prompt_s:  # three digits at least, so that computed / time gives the rate shown
        text += f" in {_three_digits(prompt_s)}, {computed / prompt_s:.1f} tokens/s"
    text += f"; decode: {generated} tokens"
    if (n_decode := generated - 1) > 0 and decode_s:
        text += f", {n_decode / decode_s:.1f} tokens/s"
    return text


def speculation_text(tokens: int, steps: int, drafted: int, accepted: int, rounds: int) -> str:
    """What speculation did after the first token: tokens per step, drafts kept, and the
    collectives a token cost (every step's, its broadcast included; 0 on one rank)."""
    rate = f"{100 * accepted / drafted:.1f}%" if drafted else "-"
    return (f"speculation: {tokens} tokens in {steps} steps ({tokens / steps:.2f} a step), {drafted} drafted, "
            f"{accepted} accepted ({rate}), {rounds / max(tokens, 1):.1f} collective rounds a token")


def _three_digits(seconds: float) -> str:
    """1.58 ms, 11.0 ms, 224 ms, 2.07 s, 31.5 s: at least three significant digits, trailing zeros kept."""
    value, unit = (1e3 * seconds, "ms") if seconds < 0.9995 else (seconds, "s")
    decimals = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{value:.{decimals}f} {unit}"


def _report(comm, job, result, n_threads, seed: int | None, startup_s, budgets) -> None:
    """The speed line (with the seed when sampling: greedy uses none) and each rank's figures,
    the KV cache's column headed by the type the engine holds it in."""
    engine, weights, n_forward = job.engine, job.weights, result["n_forward"]

    def per_token(value: float) -> float | None:
        return value / n_forward if n_forward else None

    mine = {
        "rank": comm.rank, "threads": n_threads,
        "compute_ms": per_token(1e3 * (engine.forward_s - engine.collective_s)),
        "collective_ms": per_token(1e3 * engine.collective_s), "sent_kb": per_token(comm.bytes_sent / 1024),
        "weights_mib": weights.nbytes / 2**20, "kv_mib": engine.kv_cache_bytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cap": f"{budgets.caps[comm.rank] / 2**20:.0f}" if budgets.caps else "-",
    }
    rows = comm.gather_obj(mine)
    if comm.rank != 0:
        return
    r = result
    err = sys.stderr
    print(f"\n{speed_text(r['n_prompt'], 0, r['prompt_s'], len(r['generated']), r['decode_s'])}; "
          f"startup {startup_s:.1f} s" + (f"; seed {seed}" if seed is not None else ""), file=err)
    if r["steps"]:
        print(speculation_text(len(r["generated"]) - 1, r["steps"], r["drafted"], r["accepted"], r["decode_rounds"]),
              file=err)
    kv_head = f"kv MiB {engine.kv_type.name}"
    kv_width = max(8, len(kv_head))
    print(f"{'rank':>4} {'threads':>7} {'compute ms/tok':>14} {'collective ms/tok':>17} {'sent KiB/tok':>12} "
          f"{'weights MiB':>11} {kv_head:>{kv_width}} {'peak RSS MiB':>12} {'cap MiB':>8}", file=err)

    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for m in rows:
        print(f"{m['rank']:>4} {m['threads']:>7} {cell(m['compute_ms'], 14, 3)} {cell(m['collective_ms'], 17, 3)} "
              f"{cell(m['sent_kb'], 12, 2)} {m['weights_mib']:>11.2f} {m['kv_mib']:>{kv_width}.2f} {m['peak_rss_mib']:>12.1f} "
              f"{m['cap']:>8}", file=err)
    if job.auto is not None and r["n_decode"]:
        auto = job.auto
        print(f"--memory-budget auto: predicted {1e3 * auto.token_s:.1f} ms per decoded token, measured "
              f"{1e3 * r['decode_s'] / r['n_decode']:.1f}; compute per rank predicted "
              + " ".join(f"{1e3 * t:.1f}" for t in auto.rank_token_s) + " ms (measured: compute ms/tok above)", file=err)


def _a_source(path: Path) -> bool:
    """Whether --model names a model still to convert (a GGUF, a Hugging Face directory, ...),
    not a model file or shard directory (whose own errors open_model gives)."""
    import h5py

    from ..files.modelfile import shard_files

    if path.is_dir():
        return not shard_files(path)[0]
    return path.is_file() and not h5py.is_hdf5(path)


def _mpi_here() -> str:
    """A dry run's words for the MPI a launch from here would use (it starts no MPI itself)."""
    from ..parallel import mpi_runtime
    from ..parallel.comm import library

    try:
        lib = library()
    except UsageError as exc:  # no MPI library here (a login node): sizing needs none
        return f"none loadable here: {exc}"
    return f"{lib.describe()}; launch with {mpi_runtime.launcher_for(lib)}"


def _dry_run(argv) -> int:
    """The plan, traffic and memory of a launch, from the model's attributes alone; the same
    start-up rules as a launch (launch.plan_launch, launch.check_fit)."""
    from ..files.convert import source_spec
    from ..files.modelfile import ModelFileError, open_model
    from ..files.synthetic import SYNTHETIC_SPEC
    from ..job.autobudget import solve
    from ..job.launch import check_fit, plan_launch
    from ..job.speed import RankSpeed
    from ..parallel.budgets import RUNTIME_BYTES, Budgets, format_bytes, rank_need

    args = _parse(None, argv)
    launch = launch_from_env()
    if launch is not None and (launch.size or 1) > 1:
        raise UsageError("--dry-run runs as one process: start it without mpirun (the budgets give the world size)")
    given = args.memory_budget or ["1"]
    auto = given[0].lower() == "auto"
    if auto and len(given) == 1:
        raise UsageError("--dry-run with --memory-budget auto needs the world size: give one size per rank after "
                         "auto (auto 6GiB 2GiB); auto itself measures the ranks when the job starts")
    budgets = parse_budgets(given, len(given) - auto)
    if auto:
        print("note: --memory-budget auto measures each rank when the job starts; sized here as it splits ranks of "
              "equal speed within the caps given", file=sys.stderr)
    if args.model is None:
        spec, shard, name = SYNTHETIC_SPEC, None, "the built-in synthetic model"
    elif _a_source(Path(args.model)):
        spec, shard, name = source_spec(args.model), None, str(args.model)
        print(f"note: {name} is not converted yet: sized as dllama-mpi-convert would write it with its defaults "
              f"(weights {spec.weights_text})", file=sys.stderr)
    else:
        model = open_model(args.model)
        spec, shard, name, model_id = model.spec, model.shard, str(args.model), model.model_id
        model.close()
    n_slots = getattr(args, "slots", 1)  # serve: the KV cache of every slot
    launch = plan_launch(spec, shard, args.model, budgets, args.max_seq_len, n_slots, kv_type=args.kv_type)
    if auto and budgets.caps:  # as the solver splits ranks of equal speed: the caps may bound a rank's share
        equal = [RankSpeed(1.0, 0.0, ())] * len(budgets.caps)
        ratios, _ = solve(spec, equal, list(budgets.caps), launch.max_seq_len, n_slots, launch.load_buffer,
                          kv_type=launch.kv_type)
        budgets = Budgets(ratios, budgets.caps)
        launch = plan_launch(spec, shard, args.model, budgets, args.max_seq_len, n_slots, kv_type=args.kv_type)
    plan, max_seq_len = launch.plan, launch.max_seq_len
    if shard is not None:  # every rank's shard, as the launch's ranks would check theirs
        problems = []
        for rank in range(plan.world_size):
            try:
                shard_file = open_model(args.model, rank, plan.world_size)
                try:
                    shard_file.check_shard(rank, plan, model_id)
                finally:
                    shard_file.close()
            except ModelFileError as exc:
                problems.append(str(exc))
        if problems:
            raise UsageError("; ".join(problems))
    for note in launch.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"MPI: {_mpi_here()}")
    print(f"model: {name}: {spec.architecture}, dim {spec.dim}, hidden {spec.hidden_dim}, {spec.n_layers} layers, "
          f"{spec.n_heads} heads ({spec.n_kv_heads} KV, head_dim {spec.head_dim}), vocab {spec.vocab_size}, "
          f"weights {spec.weights_text}")
    print(f"plan {plan.plan_hash()}: {plan.world_size} rank(s), budgets {' '.join(map(str, plan.budgets))}, "
          f"KV cache {f'{n_slots} slots x ' if n_slots > 1 else ''}{max_seq_len} tokens in {launch.kv_type}")
    print(plan.table(max_seq_len, n_slots, launch.kv_type))
    by_type = {t: plan.traffic(t) for t in quant.BUFFER_TYPES}
    print(f"\nper decoded token: {by_type[quant.Q80_ACTIVATIONS.name].collectives} collectives "
          f"(4 Allgatherv per layer, the embeddings' Allreduce, the logits' Gatherv)")
    print(f"{'rank':>4} " + " ".join(f"{'sends KiB (' + t + ')':>17}" for t in by_type)
          + f" {'weights + KV MiB':>16} {'need MiB':>9} {'cap':>8}")
    for s in plan.ranks:
        parts = rank_need(plan, s.rank, max_seq_len, launch.load_buffer, n_slots, kv_type=launch.kv_type)
        memory, need = (parts["weights"] + parts["kv"]) / 2**20, sum(parts.values()) / 2**20
        cap = format_bytes(budgets.caps[s.rank]) if budgets.caps else "-"
        print(f"{s.rank:>4} " + " ".join(f"{tr.payload[s.rank] / 1024:>17.1f}" for tr in by_type.values())
              + f" {memory:>16.1f} {need:>9.1f} {cap:>8}")
    for t, tr in by_type.items():
        print(f"{t} buffers: {tr.wire / 1024:.1f} KiB cross between ranks per token in all; at 1 Gbit/s that is "
              f"{8e3 * tr.wire / 1e9:.2f} ms of transfer if it all shared one link")
    kv_row = quant.KV_TYPES[launch.kv_type].row_bytes(spec.head_dim)
    print(f"KV = 2 (key and value) x {spec.n_layers} layers x the rank's KV heads x {max_seq_len} tokens"
          + (f" x {n_slots} slots" if n_slots > 1 else "") + f" x {kv_row} bytes (a head's row of {spec.head_dim} "
          f"values in {launch.kv_type}; --kv-type)")
    print(f"need = weights + KV + runtime {format_bytes(RUNTIME_BYTES)}"
          + (f" + rank 0's load buffer {format_bytes(launch.load_buffer)} (the largest tensor)" if launch.load_buffer else "")
          + (" + one layer's experts, held twice while loading packs them" if spec.moe else ""))
    # the nodes are not known here: each rank on a node of its own, of unknown memory
    check_fit(launch, budgets, [f"node of rank {r}" for r in range(plan.world_size)], [None] * plan.world_size)
    return 0
