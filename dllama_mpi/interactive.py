"""`python -m dllama_mpi chat`: a conversation on rank 0's terminal, rendered with the
model's own chat template (chat.py); each turn reuses the KV cache of the conversation so
far and prefills only the new message.

Rank 0 reads a line, submits it as a request to the scheduler and runs the scheduler until
the answer ends; the followers wait for steps with a sleeping poll meanwhile. Ctrl-C while
an answer is being written stops that answer; at the prompt (or Ctrl-D, /exit) it ends the
chat. Followers ignore SIGINT (the launcher forwards it to every rank) and leave when
rank 0 tells them.
"""

from __future__ import annotations

import signal
import sys

from .errors import InputError

HELP = "type a message; /clear starts a new conversation, /exit (or Ctrl-D) ends the chat, Ctrl-C stops an answer"


def chat(comm, args, budgets, announce) -> int:
    from .job import open_job
    from .request import GenRequest, Sampling, check_prompt_length
    from .scheduler import Scheduler, follow

    if comm.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def check(tokenizer, launch):  # rank 0, before loading
        if tokenizer.chat_template is None:
            raise InputError("this model has no chat template (convert it from a checkpoint that has one, e.g. a "
                             "Hugging Face instruct model or a GGUF with tokenizer.chat_template); use --prompt for "
                             "plain text generation")

    job = open_job(comm, args.model, budgets, max_seq_len=args.max_seq_len, buffer_type=args.buffer_float_type,
                   check=check, announce=announce)
    if comm.rank != 0:
        follow(job)
        return 0
    from . import chat as templates

    scheduler = Scheduler(job)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print(HELP, file=sys.stderr)
    # an exception below is a bug: run_guarded aborts the job (the followers may be inside a
    # step's collectives), so the followers' exit message is sent on the normal path only
    while True:
        try:
            line = input("> ")
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
            _check_utf8(line)
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


def _check_utf8(line: str) -> None:
    """A byte that is not UTF-8 arrives from the terminal as a lone surrogate."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"the message is not valid UTF-8 (at character {exc.start}); type it again") from None


def _answer(scheduler, req) -> str:
    """Run one request to its end, writing its text as it comes; Ctrl-C stops it early."""
    from .request import Failed, Finished, Piece

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
    print()
    return "".join(e.text for e in events if isinstance(e, (Piece, Finished)))
