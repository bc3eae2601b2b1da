"""`python -m dllama_mpi perplexity`: how well a model predicts a text, and how far its
next-token distributions are from a base model's (what a conversion or quantization costs),
as llama.cpp's `llama-perplexity` (and its `--kl-divergence-base` / `--kl-divergence`) does.

Runs under any `mpirun -n N ... --memory-budget ...`. Rank 0 reads and tokenizes the text,
splits the tokens into chunks of --ctx tokens (BOS first where the model has one), and drives
the engine through each chunk, every rank taking part in each step as in generation (the
step's engine.Batch broadcast, the followers in scheduler.follow). Each step returns the
logits of all its rows that are scored: as llama.cpp does, only the second half of each
chunk's positions is scored, so every scored token has at least half a chunk of context.
Rank 0 computes log-softmax in float64: nll = -log p(next token); PPL = exp(mean nll), its
uncertainty from the standard error of the mean nll (the delta method: PPL x stderr).

--save-logits FILE keeps the float32 logits of every scored position (an HDF5 file, rank 0
writes it: first to a temporary beside it, renamed when complete); --kl-base FILE compares
this model's distributions with them: KL(base || this) per position, in float64, and
how often both models rank the same token first. The saved file records the model, its
vocabulary size, the chunk length and a hash of the token ids as fed; a comparison whose
vocabulary, chunks or tokens differ is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError, UsageError
from ..files.atomic_output import Owner, Temporary, check_target, install, is_hdf5_of, remove_stale
from ..files.text import utf8
from .launcher import Parser, add_job_options, parse_args, parse_budgets, run_job

DEFAULT_CTX = 512  # chunk length unless --ctx (or a --kl-base file) says otherwise, at most the model's seq_len
MIN_CTX = 3  # a chunk of 3 scores one token (position 1 predicting token 2)
LOGITS_FORMAT = "dllama_mpi logits"
LOGITS_VERSION = 1
CHUNK_BYTES = 256 * 1024  # HDF5 chunk of the saved logits: whole rows, about this many bytes
PROGRESS_EVERY_S = 1.0  # a progress line at most this often (and after the last chunk)


# --------------------------------------------------------------------------- the text in chunks
@dataclass
class Chunks:
    """The token ids as fed: n_chunks rows of n_ctx tokens, each starting with BOS where the
    model has one (llama.cpp overwrites a chunk's first token with BOS the same way)."""

    tokens: np.ndarray  # (n_chunks, n_ctx) int64
    n_text: int  # tokens of the whole text (BOS included where the model adds one)
    ctx: int  # the chunk length asked for (--ctx)
    dropped: int  # tokens after the last whole chunk (or beyond --chunks): not fed

    @property
    def n_chunks(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def first(self) -> int:
        """The first scored position of every chunk: its logits predict token first + 1."""
        return self.n_ctx // 2

    @property
    def per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.per_chunk

    @property
    def short(self) -> bool:
        return self.n_ctx < self.ctx

    def digest(self) -> str:
        """sha256 of the ids as fed (little-endian int64, row by row) and their shape."""
        h = hashlib.sha256(f"{self.n_chunks}x{self.n_ctx}:".encode())
        h.update(self.tokens.astype("<i8").tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        s = (f"{self.n_text} tokens; {self.n_chunks} chunk(s) of {self.n_ctx}, scored positions {self.first}.."
             f"{self.n_ctx - 2} of each: {self.n_scored} tokens")
        if self.dropped:
            s += f" (the last {self.dropped} tokens are not scored)"
        return s


def make_chunks(ids: list[int], bos: int | None, ctx: int, max_chunks: int | None = None) -> Chunks:
    """Split the text's ids into chunks of `ctx` (one shorter chunk when the text has fewer);
    InputError when too short to score a token."""
    n = len(ids)
    n_ctx = ctx if n >= ctx else n
    if n_ctx - 1 - n_ctx // 2 < 1:
        raise InputError(f"the text is {n} token(s){' with BOS' if bos is not None else ''}; scoring needs at "
                         f"least {MIN_CTX} (the second half of a chunk is scored, each position predicting the "
                         "next token): give a longer text")
    n_chunks = n // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    tokens = np.array(ids[: n_chunks * n_ctx], np.int64).reshape(n_chunks, n_ctx)
    if bos is not None:
        tokens[:, 0] = bos
    return Chunks(tokens, n, ctx, n - n_chunks * n_ctx)


def read_text(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise InputError(f"text file {p} does not exist; give --text a UTF-8 text file to score")
    if not p.is_file():
        raise InputError(f"{p} is not a regular file; give --text a UTF-8 text file to score")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"can't read {p}: {exc.strerror or exc}") from None
    return utf8(raw, f"--text {p}", "convert it (e.g. iconv -t UTF-8)")


def tokenize(tokenizer, text: str) -> tuple[list[int], int | None]:
    """The text's ids as llama.cpp's perplexity tokenizes it: BOS first where the model adds
    one, special-token text read as plain text. Returns (ids, bos id or None)."""
    bos = tokenizer.encode("", bos=True)
    ids = tokenizer.encode(text, bos=True, special=False)
    return ids, (bos[0] if bos else None)


# --------------------------------------------------------------------------- statistics (pure)
def mean_stderr(values: np.ndarray) -> tuple[float, float | None]:
    """The mean and its standard error, sqrt(var / (n - 1)) (llama.cpp's); None for one value."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None
    var = float(np.mean(v * v)) - mean * mean
    return mean, math.sqrt(max(var, 0.0) / (len(v) - 1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(m, vocab) float32 -> float64 log-probabilities."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    x -= top
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def ppl_summary(nll: np.ndarray) -> dict:
    mean, err = mean_stderr(nll)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": None if err is None else ppl * err, "mean_nll": mean, "nll_stderr": err,
            "n_scored": int(len(nll))}


def kl_summary(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, same_top: np.ndarray, dp: np.ndarray) -> dict:
    """llama-perplexity --kl-divergence's statistics: this model (Q) against the base."""
    n = len(nll)
    base = ppl_summary(nll_base)
    ln_ratio, ln_ratio_err = mean_stderr(nll - nll_base)
    ratio = math.exp(ln_ratio)
    kl_mean, kl_err = mean_stderr(kld)
    top = float(np.mean(same_top))
    cor = None
    if n > 1 and np.std(nll) > 0 and np.std(nll_base) > 0:
        cor = float(np.corrcoef(nll, nll_base)[0, 1])
    dp_mean, dp_err = mean_stderr(dp)
    return {
        "ppl_base": base["ppl"], "ppl_base_stderr": base["ppl_stderr"], "cor_ln_ppl": cor,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_stderr": ln_ratio_err,
        "ppl_ratio": ratio, "ppl_ratio_stderr": None if ln_ratio_err is None else ratio * ln_ratio_err,
        "kld_mean": kl_mean, "kld_stderr": kl_err, "kld_max": float(kld.max()),
        "kld_p99_9": float(np.percentile(kld, 99.9)), "kld_p99": float(np.percentile(kld, 99)),
        "kld_median": float(np.median(kld)), "kld_min": float(kld.min()),
        "same_top": top, "same_top_stderr": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else None,
        "dp_mean": dp_mean, "dp_stderr": dp_err, "dp_rms": float(np.sqrt(np.mean(dp * dp))),
    }


# --------------------------------------------------------------------------- logits files
def is_logits_file(path: Path) -> bool:
    """A plain file holding logits this program saved (what --force may replace)."""
    return is_hdf5_of(path, LOGITS_FORMAT)


def _not_logits(path: Path) -> str | None:
    """Why what stands at --save-logits `path` (not a link) is not a logits file to replace, or None."""
    if path.is_dir():
        return f"--save-logits {path} is a directory; give a file name, e.g. {path / 'base-logits.h5'}"
    if not is_logits_file(path):
        return (f"--save-logits {path} exists and is not a logits file saved by python -m dllama_mpi perplexity; "
                f"{SAVED_LOGITS.only}: remove it yourself or choose another name")
    return None


SAVED_LOGITS = Owner("--save-logits", "--force replaces only a logits file this program wrote", _not_logits,
                     "changed while the logits were saved (another run saving them at the same time?); this run "
                     "replaced nothing: check what is there, or run again")


def check_save_path(path: Path, force: bool) -> None:
    """Whether --save-logits may write `path` (atomic_output.check_target), and in advance, as
    the model is loaded before anything is written: whether its directory may be written."""
    check_target(path, force, SAVED_LOGITS)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"can't write in {path.parent}: permission denied; save the logits somewhere you may write to")


def logits_bytes(chunks: Chunks, vocab_size: int) -> int:
    """About what a --save-logits file takes: 4 bytes per vocabulary entry per scored position."""
    return chunks.n_scored * (4 * vocab_size + 8) + chunks.tokens.nbytes


def check_room(path: Path, chunks: Chunks, vocab_size: int) -> None:
    need, free = logits_bytes(chunks, vocab_size), shutil.disk_usage(path.parent).free
    if need > free:
        raise InputError(f"--save-logits {path} would take about {need / 2**20:.1f} MiB ({chunks.n_scored} scored "
                         f"positions x {vocab_size} float32 logits) but {path.parent} has {free / 2**20:.1f} MiB free; "
                         "free some space, save elsewhere, or score fewer tokens (--chunks)")


@dataclass
class BaseInfo:
    path: Path
    attrs: dict
    llama_tokens: np.ndarray | None = None  # llama.cpp's file: the (n_chunks, ctx) token ids it scored


LLAMA_MAGIC = b"_logits_"  # llama-perplexity --kl-divergence-base's file
LLAMA_LOG_PROB_FLOOR = -16.0  # its log-probs are stored from max - 16 up: lower ones count as absent, as it does


def _llama_row_width(vocab_size: int) -> int:
    """uint16 words per scored position in llama.cpp's file: 2 floats (scale, min log-prob), then the vocabulary
    padded to even (perplexity.cpp: nv = 2 * ((n_vocab + 1) / 2) + 4)."""
    return 2 * ((vocab_size + 1) // 2) + 4


def _read_llama_base(path: Path) -> BaseInfo:
    """llama-perplexity --kl-divergence-base FILE: "_logits_", n_ctx u32, n_vocab i32, n_chunk i32, the
    n_chunk x n_ctx token ids (i32), then per scored position (the second half of each chunk, as here)
    its log-probabilities as uint16 steps above a minimum."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20:
            raise InputError(f"--kl-base {path} is a truncated llama.cpp logits file ({size} bytes); save it again")
        ctx, vocab, n_chunks = (int(v) for v in np.frombuffer(head[8:20], "<i4"))
        if ctx < MIN_CTX or vocab < 1 or n_chunks < 1:
            raise InputError(f"--kl-base {path}: llama.cpp logits file with n_ctx {ctx}, n_vocab {vocab}, n_chunk "
                             f"{n_chunks}; expected positive sizes (a context of at least {MIN_CTX})")
        per_chunk = ctx - 1 - ctx // 2
        expected = 20 + 4 * ctx * n_chunks + 2 * n_chunks * per_chunk * _llama_row_width(vocab)
        if size != expected:
            raise InputError(f"--kl-base {path}: a llama.cpp logits file of {n_chunks} chunk(s) of {ctx} over "
                             f"{vocab} tokens has {expected} bytes, this one {size}: truncated or damaged")
        tokens = np.frombuffer(f.read(4 * ctx * n_chunks), "<i4").astype(np.int64).reshape(n_chunks, ctx)
    chunks = Chunks(tokens, n_chunks * ctx, ctx, 0)
    attrs = {"format": "llama.cpp", "vocab_size": vocab, "ctx": ctx, "n_chunks": n_chunks,
             "n_scored": n_chunks * per_chunk, "tokens_sha256": chunks.digest(), "model": "llama.cpp", "model_id": None}
    return BaseInfo(path, attrs, tokens)


def read_base(path: Path) -> BaseInfo:
    """A --kl-base file's attributes, checked to be a complete logits file: ours, or
    llama-perplexity's --kl-divergence-base file."""
    import h5py

    from ..files.attributes import plain

    if not path.exists():
        raise InputError(f"--kl-base {path} does not exist; save one first with --save-logits {path} "
                         "(running the base model on the same text)")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(len(LLAMA_MAGIC)) == LLAMA_MAGIC:
                return _read_llama_base(path)
    if not is_logits_file(path):
        raise InputError(f"--kl-base {path} is not a logits file saved by python -m dllama_mpi perplexity "
                         "--save-logits or by llama-perplexity --kl-divergence-base")
    try:
        with h5py.File(path, "r") as f:
            attrs = plain(f.attrs)
            shape, dtype = f["logits"].shape, f["logits"].dtype
            nll_shape = f["nll"].shape
    except Exception as exc:  # the HDF5 library reports damage as any of several exceptions
        raise InputError(f"--kl-base {path} is damaged ({type(exc).__name__}: {exc}); save it again") from None
    want = ("format_version", "vocab_size", "ctx", "n_chunks", "n_scored", "tokens_sha256", "model_id")
    missing = [k for k in want if k not in attrs]
    if missing or attrs["format_version"] != LOGITS_VERSION:
        raise InputError(f"--kl-base {path}: expected logits format version {LOGITS_VERSION} with "
                         f"{', '.join(want)}; found version {attrs.get('format_version')!r}"
                         f"{', missing ' + ', '.join(missing) if missing else ''}: save it again with this version")
    if shape != (attrs["n_scored"], attrs["vocab_size"]) or dtype != np.float32 or nll_shape != (attrs["n_scored"],):
        raise InputError(f"--kl-base {path} is inconsistent (logits {dtype} {shape} for {attrs['n_scored']} scored "
                         f"positions of a vocabulary of {attrs['vocab_size']}); save it again")
    return BaseInfo(path, attrs)


def check_base(base: BaseInfo, vocab_size: int, chunks: Chunks) -> None:
    """The base's logits are of the positions this run scores, over the same vocabulary."""
    a, p = base.attrs, base.path
    if a["vocab_size"] != vocab_size:
        raise InputError(f"--kl-base {p} holds logits over a vocabulary of {a['vocab_size']} tokens, but this model's "
                         f"has {vocab_size}: KL divergence compares models that share one vocabulary")
    if chunks.n_ctx != a["ctx"] and chunks.n_text >= a["ctx"]:
        raise InputError(f"--kl-base {p} was saved with chunks of {a['ctx']} tokens, this run's are {chunks.n_ctx}; "
                         f"pass --ctx {a['ctx']}")
    if (chunks.n_ctx, chunks.n_chunks, chunks.digest()) != (a["ctx"], a["n_chunks"], a["tokens_sha256"]):
        raise InputError(f"--kl-base {p} was saved for other tokens: {a['n_chunks']} chunk(s) of {a['ctx']} "
                         f"(token hash {a['tokens_sha256'][:12]}), this run has {chunks.n_chunks} of {chunks.n_ctx} "
                         f"(hash {chunks.digest()[:12]}); compare on the base run's --text (and --chunks), with a "
                         "model that tokenizes it as the base model does")


class BaseLogProbs:
    """Rank 0 reads the base's log-probabilities of scored positions, in order."""

    def __init__(self, base: BaseInfo):
        import h5py

        self.base, self.vocab = base, int(base.attrs["vocab_size"])
        if base.llama_tokens is not None:
            width = _llama_row_width(self.vocab)
            offset = 20 + 4 * base.llama_tokens.size
            self.file = None
            self.rows = np.memmap(base.path, "<u2", "r", offset, (int(base.attrs["n_scored"]), width))
        else:
            self.file = h5py.File(base.path, "r")
            self.rows = self.file["logits"]

    def __call__(self, start: int, m: int) -> np.ndarray:
        """(m, vocab) float64 log-probabilities of scored positions start .. start + m - 1."""
        rows = np.asarray(self.rows[start : start + m])
        if self.file is not None:
            return log_softmax(rows)
        scale_min = np.ascontiguousarray(rows[:, :4]).view("<f4")  # (m, 2): scale, min log-prob
        steps = rows[:, 4 : 4 + self.vocab].astype(np.float32)
        # as llama.cpp reads them back: scale * q + min, in float
        return (scale_min[:, :1] * steps + scale_min[:, 1:]).astype(np.float64)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.rows = None


class LogitsWriter:
    """Rank 0 saves the scored positions' logits: to a temporary beside `path`, renamed over
    it when complete (a run that fails or is killed leaves no half-written file, and an
    existing file is replaced only then, and only if it is still one this program wrote)."""

    def __init__(self, path: Path, chunks: Chunks, vocab_size: int, attrs: dict):
        self.path = path
        remove_stale(path)
        self.tmp = Temporary(path)
        rows = max(1, min(chunks.n_scored, CHUNK_BYTES // (4 * vocab_size)))
        try:
            self.file = self.tmp.create_file(rdcc_nbytes=max(1 << 20, 8 * rows * 4 * vocab_size))
        except OSError as exc:
            raise InputError(f"can't write {self.tmp.path}: {exc}") from None
        try:
            self.file.attrs.update({"format": LOGITS_FORMAT, "format_version": LOGITS_VERSION, **attrs})
            self.file.create_dataset("tokens", data=chunks.tokens)
            self.logits = self.file.create_dataset("logits", (chunks.n_scored, vocab_size), np.float32,
                                                   chunks=(rows, vocab_size))
        except BaseException:
            self.discard()
            raise

    def write(self, start: int, logits: np.ndarray) -> None:
        self.logits[start : start + len(logits)] = logits

    def finish(self, nll: np.ndarray) -> None:
        try:
            self.file.create_dataset("nll", data=nll)
            self.tmp.unmark(self.file)
            self.file.close()
            install(self.tmp.path, self.path, SAVED_LOGITS)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass
        self.tmp.discard()


# --------------------------------------------------------------------------- scoring
class Scores:
    """Rank 0's running results: per scored position nll (and, against a base, KL, same top
    token, the next token's probability change)."""

    def __init__(self, n: int, kl: bool):
        self.nll = np.zeros(n, np.float64)
        self.kl = kl
        if kl:
            self.nll_base = np.zeros(n, np.float64)
            self.kld = np.zeros(n, np.float64)
            self.same_top = np.zeros(n, bool)
            self.dp = np.zeros(n, np.float64)
        self.n = 0

    def add(self, logits: np.ndarray, targets: np.ndarray, logq: np.ndarray | None, floor: float | None = None) -> None:
        """logq: the base's log-probabilities of these positions; with a floor (llama.cpp's base), those at
        or below it are left out of the KL sum, as llama-perplexity does."""
        m, k = len(targets), self.n
        rows = np.arange(m)
        logp = log_softmax(logits)
        self.nll[k : k + m] = -logp[rows, targets]
        if self.kl:
            self.nll_base[k : k + m] = -logq[rows, targets]
            pq = np.exp(logq) if floor is None else np.where(logq > floor, np.exp(logq), 0.0)
            self.kld[k : k + m] = (pq * (logq - logp)).sum(axis=1)
            self.same_top[k : k + m] = np.argmax(logp, axis=1) == np.argmax(logq, axis=1)
            self.dp[k : k + m] = np.exp(logp[rows, targets]) - np.exp(logq[rows, targets])
        self.n += m


def score(job, chunks: Chunks | None, base: BaseInfo | None = None, writer: LogitsWriter | None = None,
          progress=None) -> Scores | None:
    """Collective. Rank 0 (with the chunks) drives the steps and returns the scores; the other
    ranks (chunks None) follow every step and return None."""
    from ..serving.scheduler import OP_EXIT, OP_STEP, follow

    comm, engine = job.comm, job.engine
    if comm.rank != 0:
        follow(job)
        return None
    batch = engine.new_batch()
    scores = Scores(chunks.n_scored, base is not None)
    base_rows = BaseLogProbs(base) if base is not None else None
    floor = LLAMA_LOG_PROB_FLOOR if base is not None and base.llama_tokens is not None else None
    try:
        for c in range(chunks.n_chunks):
            row = chunks.tokens[c]
            pos = 0
            while pos < chunks.n_ctx:
                batch.clear(OP_STEP)
                wanted = []  # positions whose logits this step returns
                while pos < chunks.n_ctx and batch.n < engine.max_rows:
                    scored = chunks.first <= pos < chunks.n_ctx - 1
                    if scored and len(wanted) == engine.max_logits:
                        break
                    batch.add(int(row[pos]), 0, pos, scored)
                    if scored:
                        wanted.append(pos)
                    pos += 1
                comm.bcast_idle(batch.wire)
                logits = engine.step(batch)
                if wanted:
                    start = scores.n
                    targets = row[np.array(wanted) + 1]
                    theirs = base_rows(start, len(wanted)) if base_rows is not None else None
                    if writer is not None:
                        writer.write(start, logits)
                    scores.add(logits, targets, theirs, floor)
            if progress is not None:
                progress(c + 1, chunks.n_chunks, scores)
    finally:
        if base_rows is not None:
            base_rows.close()
    # only after the last step: a rank 0 that fails mid-way ends the job (launcher.run_guarded's abort)
    batch.clear(OP_EXIT)
    comm.bcast_idle(batch.wire)
    return scores


class Progress:
    """Rank 0's progress on stderr: chunk i/n, the running PPL, time left."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int, scores: Scores) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < PROGRESS_EVERY_S and done > 1:
            return
        self.last = now
        elapsed = now - self.t0
        ppl = math.exp(float(scores.nll[: scores.n].mean()))
        left = elapsed / done * (total - done)
        print(f"[{done}/{total}] running PPL {ppl:.4f}; {elapsed:.1f} s" + (f", ~{left:.0f} s left" if done < total else ""),
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dllama_mpi perplexity", allow_abbrev=False,
              description="Perplexity of a model over a text, and with --kl-base the KL divergence of its "
                          "next-token distributions from a base model's saved logits (llama.cpp's llama-perplexity "
                          "and its --kl-divergence). The text's tokens are cut into chunks of --ctx tokens, each "
                          "starting with BOS (where the model has one); as llama.cpp does, only the second "
                          "half of each chunk's positions is scored (every scored token sees at least half a chunk "
                          "of context); tokens after the last whole chunk are not scored. A text shorter than one "
                          "chunk is scored as one shorter chunk. Runs under any mpirun -n N.")
    add_job_options(p, model_default=None)
    p.add_argument("--text", metavar="FILE", help="UTF-8 text file to score (required, unless --kl-base is a "
                                                  "llama.cpp file: its token ids are scored)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help=f"chunk length in tokens (default: a --kl-base file's, else the model's seq_len, at most "
                        f"{DEFAULT_CTX}); the KV cache holds one chunk")
    p.add_argument("--chunks", type=int, metavar="N", help="score at most the first N chunks (default: all)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--save-logits", metavar="FILE",
                       help="save the logits of every scored position (float32, HDF5: 4 bytes x the vocabulary per "
                            "scored token) as the base for a later --kl-base run (llama.cpp's --kl-divergence-base); "
                            "refused if FILE exists unless --force")
    which.add_argument("--kl-base", metavar="FILE",
                       help="a --save-logits file of a base model on the same text, or llama.cpp's "
                            "(llama-perplexity --kl-divergence-base FILE; its token ids are then scored, the same "
                            "model's GGUF compares the two engines): print KL(base || this model) per position "
                            "(mean, median, max, percentiles), how often both rank the same token first, and both PPLs")
    p.add_argument("--force", action="store_true",
                   help="let --save-logits replace a logits file saved before (never any other file)")
    p.add_argument("--json", action="store_true",
                   help="print the results as one JSON object on stdout (the human-readable report goes to stderr)")
    return p


def checked_args(comm, argv) -> argparse.Namespace:
    args = parse_args(build_parser(), argv, comm.rank)
    problems = []
    if args.ctx is not None and args.ctx < MIN_CTX:
        problems.append(f"--ctx must be at least {MIN_CTX} (the second half of a chunk is scored), got {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        problems.append(f"--chunks must be at least 1, got {args.chunks}")
    for name in ("model", "text", "save_logits", "kl_base"):
        if getattr(args, name) == "":
            problems.append(f"--{name.replace('_', '-')} is empty; give a path")
    if args.force and not args.save_logits:
        problems.append("--force only applies to --save-logits")
    if problems:
        raise UsageError("; ".join(problems))
    return args


def _files_and_ctx(comm, args) -> tuple[str, BaseInfo | None, int]:
    """Rank 0, before anything is loaded: the text, the --kl-base file's attributes, the
    --save-logits place, and the chunk length (--ctx, the base's, or from the model's
    attributes)."""
    from ..files.modelfile import check_not_a_loop, open_model

    check_not_a_loop(Path(args.model), "point --model at the model file (or the directory of its shards)")
    if not Path(args.model).exists():
        raise InputError(f"model file {args.model} does not exist; give --model an .h5 file made by dllama-mpi-convert "
                         "(or a directory of its per-rank shards)")
    if args.save_logits:
        check_save_path(Path(args.save_logits), args.force)
    base = read_base(Path(args.kl_base)) if args.kl_base else None
    if args.text is None and (base is None or base.llama_tokens is None):
        raise InputError("--text is required (a UTF-8 text file to score), unless --kl-base is a llama.cpp logits "
                         "file, whose token ids are scored")
    text = read_text(args.text) if args.text is not None else None
    if args.ctx is not None:
        ctx = args.ctx
    elif base is not None:
        ctx = int(base.attrs["ctx"])
    else:
        model = open_model(args.model, 0, comm.size)
        try:
            ctx = max(MIN_CTX, min(model.spec.seq_len, DEFAULT_CTX))
        finally:
            model.close()
    return text, base, ctx


def run(comm, args) -> dict | None:
    """Collective; rank 0 returns the results."""
    from ..job.loading import open_job
    from ..kernels import qmatmul
    from ..parallel import threads

    budgets = parse_budgets(args.memory_budget, comm.size)
    threads.for_rank(comm.local_rank, comm.local_size, args.nthreads)
    setup = None
    if comm.rank == 0:
        try:
            setup = _files_and_ctx(comm, args)
        except InputError as exc:
            setup = str(exc)
    ctx = comm.bcast_obj(setup if comm.rank != 0 or isinstance(setup, str) else setup[2])
    if isinstance(ctx, str):
        raise UsageError(ctx)
    text, base = (setup[0], setup[1]) if comm.rank == 0 else (None, None)
    found = {}

    def check(tokenizer, launch):  # rank 0, before loading
        if base is not None and base.llama_tokens is not None:  # the tokens llama.cpp scored, fed as it fed them:
            tokens = base.llama_tokens[: args.chunks].copy()  # its file keeps each chunk's first token, it feeds BOS
            vocab = launch.plan.spec.vocab_size
            if tokens.size and not (0 <= tokens.min() and tokens.max() < vocab):
                raise InputError(f"--kl-base {base.path} holds token ids {tokens.min()}..{tokens.max()}, but this "
                                 f"model's vocabulary is 0..{vocab - 1}: it was saved for another model's vocabulary")
            bos = tokenize(tokenizer, "")[1]
            if bos is not None:
                tokens[:, 0] = bos
            chunks = Chunks(tokens, tokens.size, tokens.shape[1], 0)
            if chunks.n_ctx != ctx:
                raise InputError(f"--kl-base {base.path} holds chunks of {chunks.n_ctx} tokens: leave out --ctx or "
                                 f"pass --ctx {chunks.n_ctx}")
            base.attrs.update(n_chunks=chunks.n_chunks, n_scored=chunks.n_scored, tokens_sha256=chunks.digest())
        else:
            ids, bos = tokenize(tokenizer, text)
            chunks = make_chunks(ids, bos, ctx, args.chunks)
        if base is not None:
            check_base(base, launch.plan.spec.vocab_size, chunks)
        if args.save_logits:
            check_room(Path(args.save_logits), chunks, launch.plan.spec.vocab_size)
        found["chunks"] = chunks

    def announce(launch):
        plan, chunks = launch.plan, found["chunks"]
        for note in launch.notes:  # the KV cache holds one chunk: --max-seq-len is --ctx here
            print(f"note: {note.replace('--max-seq-len', '--ctx')}", file=sys.stderr)
        if chunks.short:
            print(f"note: the text is {chunks.n_text} tokens, fewer than a chunk of {ctx}: scoring it as one chunk "
                  f"of {chunks.n_ctx}", file=sys.stderr)
        print(f"plan {plan.plan_hash()}: {comm.size} rank(s), budgets {' '.join(map(str, plan.budgets))}, weights "
              f"{plan.spec.weights_text}, buffers {args.buffer_float_type}, KV cache {launch.kv_type}, kernels {qmatmul.ISA}",
              file=sys.stderr)
        source = f"text {args.text}" if args.text is not None else f"llama.cpp's tokens in {args.kl_base}"
        print(f"{source}: {chunks.describe()}", file=sys.stderr)

    # every row of a step may be scored: the engine returns the logits of up to max_rows rows at once
    job = open_job(comm, args.model, budgets, max_seq_len=ctx, buffer_type=args.buffer_float_type,
                   kv_type=args.kv_type, check=check, announce=announce, max_logits=ctx)
    chunks = found.get("chunks")
    writer = None
    spec = job.plan.spec
    if comm.rank == 0 and args.save_logits:
        writer = LogitsWriter(Path(args.save_logits), chunks, spec.vocab_size, {
            "model": str(args.model), "model_id": job.model_id or "", "weight_type": spec.weight_type,
            "buffer_float_type": args.buffer_float_type, "kv_type": args.kv_type, "vocab_size": spec.vocab_size,
            "ctx": chunks.n_ctx, "n_chunks": chunks.n_chunks, "first_scored": chunks.first, "n_scored": chunks.n_scored,
            "tokens_sha256": chunks.digest(), "text": str(args.text or ""), "world_size": comm.size,
            "written_by": f"python -m dllama_mpi perplexity (dllama_mpi {__version__})"})
    t0 = time.perf_counter()
    try:
        scores = score(job, chunks, base, writer, Progress() if comm.rank == 0 else None)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    seconds = time.perf_counter() - t0
    if comm.rank != 0:
        return None
    if writer is not None:
        writer.finish(scores.nll)
    result = {
        "model": str(args.model), "model_id": job.model_id, "weight_type": spec.weights_text,
        "buffer_float_type": args.buffer_float_type, "kv_type": args.kv_type, "world_size": comm.size,
        "budgets": list(job.plan.budgets),
        "text": args.text, "n_text_tokens": chunks.n_text, "ctx": chunks.n_ctx, "n_chunks": chunks.n_chunks,
        "first_scored": chunks.first, "dropped_tokens": chunks.dropped, **ppl_summary(scores.nll),
        "seconds": seconds, "tokens_per_s": chunks.n_chunks * chunks.n_ctx / seconds if seconds else None,
        "saved_logits": str(args.save_logits) if args.save_logits else None,
        "kl_base": None,
    }
    if base is not None:
        result["kl_base"] = {"file": str(base.path), "model": base.attrs.get("model"),
                             "model_id": base.attrs.get("model_id"),
                             **kl_summary(scores.nll, scores.nll_base, scores.kld, scores.same_top, scores.dp)}
    return result


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def report(r: dict) -> str:
    """The human-readable results (llama-perplexity's layout)."""
    scored = r["text"] or "the --kl-base file's tokens"
    lines = [f"{r['model']} ({r['weight_type']} weights, {r['buffer_float_type']} buffers, {r['kv_type']} KV cache, "
             f"{r['world_size']} rank(s)) on {scored}: {r['n_chunks']} chunk(s) of {r['ctx']} tokens, "
             f"{r['n_scored']} tokens scored in {r['seconds']:.1f} s",
             f"Final estimate: PPL = {r['ppl']:.4f} +/- {_num(r['ppl_stderr'], '.5f')}"]
    k = r["kl_base"]
    if k is not None:
        def pm(value, err, fmt="10.6f", scale=1.0):
            return f"{scale * value:{fmt}} +/- {_num(None if err is None else scale * err, fmt)}"

        lines += [
            f"base: {k['file']} (model {k['model']}, id {k['model_id']})",
            "",
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {pm(r['ppl'], r['ppl_stderr'])}",
            f"Mean PPL(base)                : {pm(k['ppl_base'], k['ppl_base_stderr'])}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {_num(None if k['cor_ln_ppl'] is None else 100 * k['cor_ln_ppl'], '6.2f')}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {pm(k['ln_ppl_ratio'], k['ln_ppl_ratio_stderr'])}",
            f"Mean PPL(Q)/PPL(base)         : {pm(k['ppl_ratio'], k['ppl_ratio_stderr'])}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {pm(k['kld_mean'], k['kld_stderr'])}",
            f"Maximum KLD: {k['kld_max']:10.6f}",
            f"99.9%   KLD: {k['kld_p99_9']:10.6f}",
            f"99.0%   KLD: {k['kld_p99']:10.6f}",
            f"Median  KLD: {k['kld_median']:10.6f}",
            f"Minimum KLD: {k['kld_min']:10.6f}",
            "",
            "====== Token probability statistics ====== (dp: this model's probability of the next token minus the base's)",
            f"Mean    dp: {pm(k['dp_mean'], k['dp_stderr'], '7.3f', 100)} %",
            f"RMS dp    : {100 * k['dp_rms']:7.3f} %",
            f"Same top p: {pm(k['same_top'], k['same_top_stderr'], '7.3f', 100)} %",
        ]
    if r["saved_logits"]:
        size = Path(r["saved_logits"]).stat().st_size / 2**20
        lines.append(f"saved the logits of {r['n_scored']} scored positions to {r['saved_logits']} ({size:.1f} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def job(comm) -> int:
        args = checked_args(comm, argv)
        result = run(comm, args)
        if comm.rank == 0:
            if args.json:
                print(report(result), file=sys.stderr)
                print(json.dumps(result), flush=True)
            else:
                print(report(result), flush=True)
        return 0

    return run_job(job)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
