"""`python -m dllama_mpi chat`: a conversation on rank 0's terminal, rendered with the
model's own chat template (serving/templates.py); each turn reuses the KV cache of the conversation so
far and prefills only the new message.

Rank 0 reads a line, submits it as a request to the scheduler and runs the scheduler until
the answer ends; the followers wait for steps with a sleeping poll meanwhile. Ctrl-C while
an answer is being written stops that answer; at the prompt (or Ctrl-D, /exit) it ends the
chat. Followers ignore SIGINT (the launcher forwards it to every rank) and leave when
rank 0 tells them.

The transcript on stdout reads as a conversation whether the messages are typed or piped
in: a line that was already waiting when the prompt was shown was not typed at it, so no
terminal echoed it there, and it is echoed after the prompt (under mpirun, rank 0's stdin is
a pipe even from a terminal, so isatty() can't tell). Each answer's speed follows on stderr.
"""

from __future__ import annotations

import os
import select
import signal
import sys

from ..errors import InputError

HELP = "type a message; /clear starts a new conversation, /exit (or Ctrl-D) ends the chat, Ctrl-C stops an answer"


def chat(comm, args, budgets, announce) -> int:
    from ..job.loading import open_job
    from ..serving.request import GenRequest, Sampling, check_prompt_length, check_utf8
    from ..serving.scheduler import Scheduler, follow
    from ..serving.speculation import check_draft_model, logit_rows, open_draft_model

    if comm.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def check(tokenizer, launch):  # rank 0, before loading
        if args.draft_model:
            check_draft_model(args.draft_model, tokenizer)
        if tokenizer.chat_template is None:
            raise InputError("this model has no chat template (convert it from a checkpoint that has one, e.g. a "
                             "Hugging Face instruct model or a GGUF with tokenizer.chat_template); use --prompt for "
                             "plain text generation")

    job = open_job(comm, args.model, budgets, max_seq_len=args.max_seq_len, buffer_type=args.buffer_float_type,
                   kv_type=args.kv_type, max_logits=logit_rows(1, args.speculate), check=check, announce=announce)
    draft = open_draft_model(comm, args.draft_model, job, args.speculate, args.kv_type) if args.draft_model else None
    if comm.rank != 0:
        follow(job)
        return 0
    from ..serving import templates

    scheduler = Scheduler(job, max_draft=args.speculate, draft=draft, min_draft=args.draft_min)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print(HELP, file=sys.stderr)
    # an exception below is a bug: run_guarded aborts the job (the followers may be inside a
    # step's collectives), so the followers' exit message is sent on the normal path only
    while True:
        try:
            line = _read_line("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line.strip() in ("/exit", "/quit", "/bye"):
            break
        if line.strip() == "/clear":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            check_utf8(line, "the message", "type it again")
            ids = templates.prompt_ids(job.tokenizer, history)
            check_prompt_length(len(ids), job.engine.max_seq_len, "/clear to start a new conversation, or raise "
                                "--max-seq-len")
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        seed = args.seed + len(history) if args.seed is not None else None
        answer = _answer(scheduler, GenRequest(ids, args.steps, Sampling(args.temperature, args.top_p, seed)))
        history.append({"role": "assistant", "content": answer})
    scheduler.exit_followers()
    return 0


def _read_line(prompt: str) -> str:
    """input(prompt), with the line echoed when it was waiting before the prompt (piped in).
    Read byte by byte from the file descriptor, so that nothing beyond this line is buffered
    and select() sees exactly what waits; bytes that are not UTF-8 become lone surrogates, as
    input() makes them."""
    waiting = bool(select.select([sys.stdin], [], [], 0)[0])
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(sys.stdin.fileno(), 1)
        if not byte:
            if not line:
                raise EOFError
            break
        line += byte
    line = line.removesuffix(b"\n")
    if waiting:  # the bytes as they came (text with a lone surrogate would fail a strict stdout)
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.buffer.flush()
    return line.decode("utf-8", "surrogateescape")


def _answer(scheduler, req) -> str:
    """Run one request to its end, writing its text as it comes, then its speed on stderr;
    Ctrl-C stops it early."""
    from ..serving.request import Failed, Finished, Piece
    from .cli import speed_text

    events = []

    def emit(event):
        if isinstance(event, (Piece, Finished)):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        events.append(event)

    req.emit = emit
    stop_answer = signal.signal(signal.SIGINT, lambda signum, frame: req.cancelled.set())
    try:
        scheduler.submit(req)
        scheduler.run(until=lambda: bool(events) and isinstance(events[-1], (Finished, Failed)))
    finally:
        signal.signal(signal.SIGINT, stop_answer)
    print(flush=True)  # before the speed line on stderr
    if isinstance(end := events[-1], Finished):
        print(speed_text(end.prompt_tokens, end.cached_tokens, end.first_token_s, end.completion_tokens, end.decode_s),
              file=sys.stderr)
    return "".join(e.text for e in events if isinstance(e, (Piece, Finished)))
