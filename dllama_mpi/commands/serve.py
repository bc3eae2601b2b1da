"""`python -m dllama_mpi serve`: one loaded model behind an OpenAI-compatible HTTP API.

Rank 0's main thread runs the scheduler (every MPI call); uvicorn runs the API (api.py) in
another thread and reaches the scheduler only through Backend.submit and the request's
events. The HTTP server listens before the model loads (/health answers 503 until it is
ready), so a port already taken fails the launch before anything is loaded.

SIGTERM or Ctrl-C on rank 0, once it serves: stop accepting requests, let the running ones
finish for up to SHUTDOWN_GRACE_S, end the rest, stop the followers, exit 0 (while loading,
the signals end the job as any job). Followers ignore both signals (the launcher forwards
them to every rank) and leave when rank 0 tells them.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from ..errors import InputError

SHUTDOWN_GRACE_S = 3.0


class Backend:
    """What the API sees of the job (api.py's contract): set up on rank 0, ready once the
    model is loaded."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.ready = threading.Event()
        self.model_id = ""
        self.max_seq_len = 0
        self.tokenizer = None
        self.grammars = None
        self._n_slots = 0
        self._scheduler = None

    def attach(self, model_id: str, job, scheduler, grammars) -> None:
        self.model_id, self.tokenizer, self.grammars, self._scheduler = model_id, job.tokenizer, grammars, scheduler
        self.max_seq_len, self._n_slots = job.engine.max_seq_len, job.engine.n_slots
        self.ready.set()

    def submit(self, req) -> None:
        self._scheduler.submit(req)

    def refusal(self):
        return self._scheduler.refusal()

    def slots_state(self) -> dict:
        return self._scheduler.slots_state()

    def slot_count(self) -> int:
        return self._n_slots


def serve(comm, args, budgets, announce) -> int:
    from ..job.loading import open_job
    from ..serving.constraints import Grammars
    from ..serving.scheduler import Scheduler, follow
    from ..serving.speculation import check_draft_model, logit_rows, open_draft_model

    if comm.rank != 0:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    server, backend = None, None
    if comm.rank == 0:
        from ..serving.api import Server, make_app
        from ..serving.metrics import Metrics

        backend = Backend(Metrics())

    def listen(tokenizer, launch):  # rank 0, before loading: a taken port fails the launch here
        nonlocal server
        if args.draft_model:
            check_draft_model(args.draft_model, tokenizer)
        server = Server(make_app(backend, api_key=args.api_key), args.host, args.port)
        try:
            server.start()
        except OSError as exc:
            raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
                             "choose another --port or --host") from None
        print(f"listening on http://{args.host}:{server.port} (503 until the model is loaded)", file=sys.stderr)

    # a failed launch leaves the HTTP server's daemon thread to end with the process
    job = open_job(comm, args.model, budgets, max_seq_len=args.max_seq_len, buffer_type=args.buffer_float_type,
                   kv_type=args.kv_type, n_slots=args.slots, max_logits=logit_rows(args.slots, args.speculate),
                   check=listen, announce=announce)
    draft = open_draft_model(comm, args.draft_model, job, args.speculate, args.kv_type) if args.draft_model else None
    if comm.rank != 0:
        follow(job)
        return 0
    scheduler = Scheduler(job, backend.metrics, max_draft=args.speculate, draft=draft, min_draft=args.draft_min,
                          max_queue=args.max_queue, queue_timeout_s=args.queue_timeout)
    model_id = args.model_name or job.name
    print("indexing the vocabulary for constrained output (response_format, tool calls)", file=sys.stderr, flush=True)
    grammars = Grammars(job.tokenizer, job.plan.spec.vocab_size, job.stop_ids)
    backend.attach(model_id, job, scheduler, grammars)
    print(f"serving {model_id} at http://{args.host}:{server.port}/v1 ({args.slots} slots, context "
          f"{job.engine.max_seq_len} tokens)", file=sys.stderr, flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # An exception below is a bug: run_guarded aborts the job (the followers may be inside a
    # step's collectives, so no exit message could reach them), and the HTTP thread dies with it.
    scheduler.run(until=stopping.is_set)
    print("shutting down: no new requests", file=sys.stderr, flush=True)
    server.refuse_new()
    deadline = time.perf_counter() + SHUTDOWN_GRACE_S
    scheduler.run(until=lambda: not scheduler.busy or time.perf_counter() > deadline)
    scheduler.fail_all("the server is shutting down")
    scheduler.exit_followers()
    server.stop()
    return 0
