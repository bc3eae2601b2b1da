"""`python tools/constrained_bench.py`: the structured-generation libraries (llguidance, xgrammar, outlines-core) on
our own vocabularies, to choose the one that enforces JSON-schema output token by token on rank 0 (issue 25).

Each library gets every vocabulary the same way: each token's bytes as our tokenizer decodes it after a neutral
previous token (-1), the special tokens (those that print nothing, BOS, EOS, <unk>) flagged as such, and the EOS
ids. Per library, vocabulary and round, in a fresh process (so that memory and one-time costs are its own):
  setup      building the library's vocabulary object, then compiling and masking a first tiny grammar (what
             a library does once, such as llguidance's index of the vocabulary on its first mask: paid once per
             model, at load);
  compile    turning each case's schema into a matcher (paid per request; xgrammar and outlines-core precompute
             their token tables here, llguidance computes masks lazily, so its first mask costs more);
  first      the first mask, which a request pays before its first token;
  per token  the mask (into a bitmask of ceil(V/32) int32 words, the layout all three write) plus the advance by
             the answer's token, over the rest of a fixed valid answer tokenized with our tokenizer: median, p95;
  RSS        peak resident memory added from before setup to the end of the cases (/proc/self/clear_refs).
Every walk checks that the library really constrains: each answer token is allowed, EOS is allowed at the end, and
"]" at the start and "," before EOS are refused. The libraries are interleaved (rotated order each round), and
the table shows medians over the rounds. --probes checks JSON Schema features (maxLength, enum, integer bounds,
anyOf, $ref, pattern, recursion) and the tool-call text format on the stories vocabulary: a valid text walks, a
violating one is refused.

    python tools/constrained_bench.py --rounds 3 --json docs/constrained-bench-avx2.json

Not run in CI; tests/test_constrained_bench.py walks the cases on stories260K's vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama_mpi.files.gguf_file import GGUFFile
from dllama_mpi.files.tokenizer import Tokenizer, from_gguf
from llamacpp_compare import cpu_model_name

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
VOCAB_FILES = {
    "qwen2.5": Path.home() / ".cache" / "dllama_mpi" / "real-models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "llama3": SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-bpe.gguf",
    "stories260K": SHARED_MODELS / "stories260K" / "tok512.bin",
}
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "hourly": {"type": "boolean"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TOOL_ANSWER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3, "hourly": false}}'
EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "role": {"enum": ["author", "editor", "reviewer"]},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                },
                "required": ["name", "role"],
                "additionalProperties": False,
            },
        },
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}},
    },
    "required": ["title", "year", "people"],
    "additionalProperties": False,
}
EXTRACTION_ANSWER = ('{"title": "A day at the park", "year": 2021, "people": [{"name": "Lily", "role": "author", "age": 34}, '
                     '{"name": "Tom", "role": "editor"}], "keywords": ["park", "sun", "dog"]}')
TOOL_PREFIX, TOOL_SUFFIX = "<tool_call>\n", "\n</tool_call>"
WARMUP = {"type": "integer"}  # compiled and masked once in setup: what a library does on its first grammar is load work


@dataclass(frozen=True)
class Case:
    """A schema, optionally inside a literal prefix and suffix (Qwen's and Hermes' tool-call text), and a valid
    answer for it."""
    name: str
    schema: dict
    answer: str
    prefix: str = ""
    suffix: str = ""


CASES = (  # json_object last: outlines-core's regex for any object is the one that may not finish
    Case("tool_call", TOOL_SCHEMA, TOOL_ANSWER),
    Case("tool_call_text", TOOL_SCHEMA, TOOL_PREFIX + TOOL_ANSWER + TOOL_SUFFIX, TOOL_PREFIX, TOOL_SUFFIX),
    Case("extraction", EXTRACTION_SCHEMA, EXTRACTION_ANSWER),
    Case("json_object", {"type": "object"}, '{"name": "Lily", "age": 3, "tags": ["cat", "park"], "happy": true}'),
)
# (feature, case, a text that violates it); the case's answer is the valid text
PROBES = (
    ("maxLength", Case("", {"type": "string", "maxLength": 5}, '"abcde"'), '"abcdef"'),
    ("enum", Case("", {"enum": ["red", "green"]}, '"red"'), '"blue"'),
    ("minimum/maximum", Case("", {"type": "integer", "minimum": 1, "maximum": 14}, "14"), "15"),
    ("anyOf", Case("", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, '"ab"'), "true"),
    ("$ref", Case("", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                       "$ref": "#/$defs/p"}, '{"x": 1}'), '{"x": "a"}'),
    ("pattern", Case("", {"type": "string", "pattern": "^[a-z]+$"}, '"abc"'), '"aB"'),
    ("recursive $ref", Case("", {"$defs": {"n": {"type": "object", "properties": {"k": {"type": "array",
                                                                                        "items": {"$ref": "#/$defs/n"}}},
                                                 "required": ["k"]}}, "$ref": "#/$defs/n"}, '{"k": [{"k": []}]}'),
     '{"k": [{"k": 1}]}'),
    ("tool-call text format", Case("", TOOL_SCHEMA, TOOL_PREFIX + TOOL_ANSWER + TOOL_SUFFIX, TOOL_PREFIX, TOOL_SUFFIX),
     TOOL_ANSWER),
)


@dataclass
class Vocab:
    """A vocabulary as every library gets it."""
    tokens: list[bytes]  # each id's bytes after a neutral previous token; b"" for the special ones
    special: list[bool]
    names: list[str]  # the special tokens' texts (llguidance names them in grammars)
    eos_ids: tuple[int, ...]
    bos_id: int | None
    tokenizer: object  # ours: encodes the answers

    @property
    def size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return answer_ids(self.tokenizer, text)

    def encode_plain(self, text: str) -> list[int]:
        """Any text (llguidance asks for some) as `answer_ids` tokenizes it, unchecked."""
        return self.tokenizer.encode(text, bos=False)


def load_tokenizer(name: str, path: Path | None = None):
    path = path or VOCAB_FILES[name]
    if not path.exists():
        raise SystemExit(f"the {name} vocabulary is read from {path}, which is missing: give its path with --{name}")
    return Tokenizer.from_llama2c(path) if path.suffix == ".bin" else from_gguf(GGUFFile(path))


def vocab_of(tok) -> Vocab:
    flagged = {tok.bos_id, *tok.eos_ids, getattr(tok, "unk_id", None)} - {None}
    tokens, special, names = [], [], []
    for i in range(tok.vocab_size):
        raw = tok.decode(-1, i)
        is_special = not raw or i in flagged
        tokens.append(b"" if is_special else raw)
        special.append(is_special)
        names.append((tok.token_text(i) or f"<[{i}]>") if is_special else "")
    return Vocab(tokens, special, names, tuple(tok.eos_ids), tok.bos_id, without_dummy_prefix(tok))


def without_dummy_prefix(tok):
    """`tok` encoding text as the model generates it after a prompt: without the sentencepiece dummy-prefix space,
    which only the start of a prompt gets."""
    plain = copy.copy(tok)
    for flag in ("add_dummy_prefix", "add_space_prefix"):
        if hasattr(plain, flag):
            setattr(plain, flag, False)
    return plain


def answer_ids(tok, text: str) -> list[int]:
    """`text`'s ids as `tok` (without_dummy_prefix's) encodes it without BOS; they must decode back to `text`."""
    ids = tok.encode(text, bos=False)
    decoded = b"".join(tok.decode(-1, i) for i in ids)
    if decoded != text.encode():
        raise ValueError(f"{text!r} tokenizes to {ids}, which decode to {decoded!r}")
    return ids


# ------------------------------------------------------------------------------------------------------ libraries
# JSON as models write it ('{"a": 1, "b": [2, 3]}') and nothing else, as dllama_mpi.serving.constraints asks of
# llguidance; xgrammar is given the same; outlines-core's regexes allow one optional space at each separator
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def literal_regex(text: str) -> str:
    """A regex matching exactly `text`, a newline spelled \\n (re.escape leaves it raw)."""
    return "".join("\\n" if c == "\n" else re.escape(c) for c in text)


class LLGuidance:
    """llguidance (MIT): an Earley parser over a lexer, masks computed lazily per step."""

    def __init__(self, vocab: Vocab) -> None:
        import llguidance
        from llguidance.numpy import fill_next_token_bitmask

        self._ll, self._fill = llguidance, fill_next_token_bitmask

        class Wrapper:  # llguidance's TokenizerWrapper protocol: special tokens are 0xFF + their name
            eos_token_id, bos_token_id = vocab.eos_ids[0], vocab.bos_id
            tokens = [b"\xff" + n.encode() if s else t for t, s, n in zip(vocab.tokens, vocab.special, vocab.names)]
            special_token_ids = [i for i, s in enumerate(vocab.special) if s]

            def __call__(self, text: bytes | str) -> list[int]:
                return vocab.encode_plain(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), n_vocab=vocab.size,
                                                eos_token=list(vocab.eos_ids))

    def compile(self, case: Case):
        if case.prefix or case.suffix:
            body = json.dumps({**case.schema, "x-guidance": JSON_STYLE})
            grammar = self._ll.LLMatcher.grammar_from_lark(
                f"start: {json.dumps(case.prefix)} body {json.dumps(case.suffix)}\nbody: %json {body}\n")
        else:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(json.dumps(case.schema), defaults=JSON_STYLE)
        matcher = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher, mask: np.ndarray) -> None:
        self._fill(matcher, mask)

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    """xgrammar (Apache-2.0): a pushdown automaton whose context-independent token masks are precomputed at
    compile time (one thread here, as rank 0 gives it)."""

    def __init__(self, vocab: Vocab) -> None:
        import xgrammar

        self._xg = xgrammar
        info = xgrammar.TokenizerInfo(vocab.tokens, xgrammar.VocabType.RAW, vocab_size=vocab.size,
                                      stop_token_ids=list(vocab.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, case: Case):
        xg = self._xg
        body = xg.Grammar.from_json_schema(json.dumps(case.schema), any_whitespace=False, separators=(", ", ": "))
        if case.prefix or case.suffix:  # xgrammar's structural tags wrap JSON the same way, in any whitespace
            body = xg.Grammar.concat(xg.Grammar.from_regex(literal_regex(case.prefix)), body,
                                     xg.Grammar.from_regex(literal_regex(case.suffix)))
        compiled = self.compiler.compile_grammar(body)
        return xg.GrammarMatcher(compiled)

    def fill(self, matcher, mask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(mask)

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    """outlines-core (Apache-2.0): the schema becomes a regex, its DFA is indexed against the whole vocabulary at
    compile time; one EOS id only."""

    def __init__(self, vocab: Vocab) -> None:
        import outlines_core

        self._oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i, (t, s) in enumerate(zip(vocab.tokens, vocab.special)):
            if not s:
                by_bytes.setdefault(t, []).append(i)
        self.eos = vocab.eos_ids[0]
        self.vocabulary = outlines_core.Vocabulary(self.eos, by_bytes)

    def compile(self, case: Case):
        regex = self._oc.json_schema.build_regex_from_schema(json.dumps(case.schema))
        regex = literal_regex(case.prefix) + regex + literal_regex(case.suffix)
        return self._oc.Guide(self._oc.Index(regex, self.vocabulary))

    def fill(self, guide, mask: np.ndarray) -> None:
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)

    def advance(self, guide, token: int) -> bool:
        if token == self.eos:  # outlines-core has no state after EOS: its mask allowing EOS is the check
            return guide.is_finished()
        try:
            guide.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


ADAPTERS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


# ----------------------------------------------------------------------------------------------------- the walk
def allowed(mask: np.ndarray, token: int) -> bool:
    return bool(int(mask.view(np.uint32)[0, token >> 5]) >> (token & 31) & 1)


def allowed_count(mask: np.ndarray, vocab_size: int) -> int:
    return int(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].sum())


def walk(lib, matcher, vocab: Vocab, text: str) -> dict:
    """Walks `text` (then EOS) through `matcher`, timing each mask plus advance; raises AssertionError where the
    library lets a wrong token through or refuses a right one."""
    ids = vocab.encode(text)
    eos = vocab.eos_ids[0]
    wrong_first, wrong_last = vocab.encode("]")[0], vocab.encode(",")[0]
    mask = np.zeros((1, (vocab.size + 31) // 32), dtype=np.int32)
    times_ns, counts = [], []
    for step, token in enumerate([*ids, eos]):
        t0 = time.perf_counter_ns()
        lib.fill(matcher, mask)
        took = time.perf_counter_ns() - t0
        counts.append(allowed_count(mask, vocab.size))
        if not allowed(mask, token):
            raise AssertionError(f"token {step} ({token}: {vocab.tokens[token]!r}) of {text!r} is refused")
        if step == 0 and allowed(mask, wrong_first):
            raise AssertionError(f"{vocab.tokens[wrong_first]!r} is allowed at the start of {text!r}")
        if token == eos and allowed(mask, wrong_last):
            raise AssertionError(f"{vocab.tokens[wrong_last]!r} is allowed after the end of {text!r}")
        t0 = time.perf_counter_ns()
        ok = lib.advance(matcher, token)
        took += time.perf_counter_ns() - t0
        if not ok:
            raise AssertionError(f"the advance by token {step} ({token}) of {text!r} fails")
        times_ns.append(took)
    return {"tokens": len(ids) + 1, "times_us": [t / 1e3 for t in times_ns], "allowed": counts}


def refuses(lib, case: Case, vocab: Vocab, text: str) -> bool:
    """Whether `case`'s grammar refuses `text` (some token masked out, or no EOS at its end)."""
    matcher = lib.compile(case)
    mask = np.zeros((1, (vocab.size + 31) // 32), dtype=np.int32)
    for token in [*vocab.encode(text), vocab.eos_ids[0]]:
        lib.fill(matcher, mask)
        if not allowed(mask, token) or not lib.advance(matcher, token):
            return True
    return False


def probe(library: str, vocab: Vocab) -> dict:
    """{feature: "enforced" | "not enforced" | the error}: a valid text walks and the violating one is refused."""
    lib = ADAPTERS[library](vocab)
    out = {}
    for feature, case, bad in PROBES:
        try:
            walk(lib, lib.compile(case), vocab, case.answer)
            out[feature] = "enforced" if refuses(lib, case, vocab, bad) else "not enforced"
        except Exception as e:
            out[feature] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return out


# ------------------------------------------------------------------------------------------------- measurement
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(library: str, vocab: Vocab, skip: list[str]) -> None:
    """One round of one library on one vocabulary: setup, then per case (but `skip`'s) compile and walk, each
    printed as one JSON line as soon as it is done, so that a case that runs past the parent's timeout loses only
    itself."""
    adapter = ADAPTERS[library]
    __import__({"outlines-core": "outlines_core"}.get(library, library))  # the import is not setup
    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    lib = adapter(vocab)
    lib.fill(lib.compile(Case("warmup", WARMUP, "1")), np.zeros((1, (vocab.size + 31) // 32), dtype=np.int32))
    print(json.dumps({"setup_ms": (time.perf_counter() - t0) * 1e3}), flush=True)
    for case in CASES:
        if case.name in skip:
            continue
        t0 = time.perf_counter()
        matcher = lib.compile(case)
        compile_ms = (time.perf_counter() - t0) * 1e3
        print(json.dumps({"case": case.name, "compile_ms": compile_ms, **walk(lib, matcher, vocab, case.answer),
                          "peak_rss_added_mib": (_status_kib("VmHWM") - rss0) / 1024}), flush=True)


def run_child(args: list[str], timeout: float) -> list[dict]:
    """The child's JSON lines; a last line {"error": ...} where it failed or ran past `timeout`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        out, failure = done.stdout, (None if done.returncode == 0 else
                                     (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = f"timeout: over {timeout:.0f} s"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return lines + ([{"error": failure}] if failure else [])


def round_record(lines: list[dict]) -> dict:
    """A measuring child's lines as {"setup_ms", "peak_rss_added_mib", "cases": {name: ...}, "error"?}."""
    cases = {d["case"]: d for d in lines if "case" in d}
    out = {"setup_ms": lines[0].get("setup_ms"), "cases": cases,
           "peak_rss_added_mib": max((c["peak_rss_added_mib"] for c in cases.values()), default=None)}
    if "error" in lines[-1]:
        out["error"] = lines[-1]["error"]
    return out


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds of each figure (the per-token ones per round first: median, p95); a case that no
    round finished gets the last error."""
    med = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    out = {"setup_ms": med([r["setup_ms"] for r in rounds if r["setup_ms"] is not None]),
           "peak_rss_added_mib": med([r["peak_rss_added_mib"] for r in rounds if r["peak_rss_added_mib"] is not None]),
           "cases": {}}
    errors = [r["error"] for r in rounds if "error" in r]
    for case in CASES:
        per = [r["cases"][case.name] for r in rounds if case.name in r["cases"]]
        if not per:
            out["cases"][case.name] = {"error": errors[-1] if errors else "not run"}
            continue
        out["cases"][case.name] = {
            "rounds": len(per),
            "compile_ms": med([c["compile_ms"] for c in per]),
            "first_mask_us": med([c["times_us"][0] for c in per]),
            "per_token_median_us": med([np.percentile(c["times_us"][1:], 50) for c in per]),
            "per_token_p95_us": med([np.percentile(c["times_us"][1:], 95) for c in per]),
            "tokens": per[0]["tokens"],
            "allowed_at_start": per[0]["allowed"][0],
        }
    return out


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: dict) -> str:
    lines = ["| vocabulary | library | setup ms | peak RSS added MiB |", "|---|---|---:|---:|"]
    for vocab, libs in summary.items():
        for lib, s in libs.items():
            lines.append(f"| {vocab} | {lib} | {_num(s['setup_ms'], 0)} | {_num(s['peak_rss_added_mib'], 0)} |")
    lines += ["", "| vocabulary | case | library | compile ms | first mask µs | per token median µs | per token p95 µs |",
              "|---|---|---|---:|---:|---:|---:|"]
    for vocab, libs in summary.items():
        for case in CASES:
            for lib, s in libs.items():
                c = s["cases"][case.name]
                if "error" in c:
                    lines.append(f"| {vocab} | {case.name} | {lib} | {c['error']} | | | |")
                else:
                    lines.append(f"| {vocab} | {case.name} | {lib} | {c['compile_ms']:.1f} | {c['first_mask_us']:.0f} | "
                                 f"{c['per_token_median_us']:.1f} | {c['per_token_p95_us']:.1f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each library once per vocabulary (default: %(default)s)")
    p.add_argument("--vocab", nargs="+", choices=list(VOCAB_FILES), default=list(VOCAB_FILES))
    p.add_argument("--library", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    for name in VOCAB_FILES:
        p.add_argument(f"--{name}", type=Path, help=f"the {name} vocabulary's file (default: {VOCAB_FILES[name]})")
    p.add_argument("--probes", action="store_true", help="also check the JSON Schema features on stories260K's vocabulary")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for one library's round on one vocabulary; the case it was in is not run again "
                        "(outlines-core indexes a large vocabulary against the regex of any object for longer) "
                        "(default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the raw rounds, the medians and the facts to FILE")
    p.add_argument("--child", nargs=3, metavar=("MODE", "LIBRARY", "VOCAB"), help=argparse.SUPPRESS)
    p.add_argument("--skip", nargs="*", default=[], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    paths = {name: getattr(args, name) or VOCAB_FILES[name] for name in VOCAB_FILES}
    if args.child:
        mode, library, name = args.child
        vocab = vocab_of(load_tokenizer(name, paths[name]))
        if mode == "measure":
            measure(library, vocab, args.skip)
        else:
            print(json.dumps(probe(library, vocab)))
        return 0
    raw: dict = {v: {lib: [] for lib in args.library} for v in args.vocab}
    skip: dict = {(v, lib): [] for v in args.vocab for lib in args.library}
    for r in range(args.rounds):
        for k, vocab in enumerate(args.vocab):
            order = [args.library[(j + r + k) % len(args.library)] for j in range(len(args.library))]
            for library in order:
                t0 = time.perf_counter()
                lines = run_child(["--child", "measure", library, vocab, f"--{vocab}", str(paths[vocab]),
                                   "--skip", *skip[vocab, library]], args.timeout)
                record = round_record(lines)
                raw[vocab][library].append(record)
                done = [*skip[vocab, library], *record["cases"]]
                if "error" in record:  # the case it was in: the first not done
                    skip[vocab, library] += [c.name for c in CASES if c.name not in done][:1]
                print(f"round {r + 1} {vocab} {library}: {time.perf_counter() - t0:.0f} s {record.get('error', '')}",
                      file=sys.stderr, flush=True)
    summary = {v: {lib: summarize(rounds) for lib, rounds in libs.items()} for v, libs in raw.items()}
    print(table(summary))
    probes = {}
    if args.probes:
        for library in args.library:
            probes[library] = run_child(["--child", "probe", library, "stories260K", "--stories260K",
                                         str(paths["stories260K"])], args.timeout)[-1]
        features = [f for f, _, _ in PROBES]
        print("\n| feature | " + " | ".join(probes) + " |\n|---|" + "---|" * len(probes))
        for f in features:
            print(f"| {f} | " + " | ".join(str(p.get(f, p.get("error"))) for p in probes.values()) + " |")
    if args.json:
        from importlib.metadata import version

        facts = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                 "versions": {lib: version(lib.replace("-", "_")) for lib in args.library}, "rounds": args.rounds,
                 "command": "python tools/constrained_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        args.json.write_text(json.dumps({"facts": facts, "summary": summary, "probes": probes, "raw": raw}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
