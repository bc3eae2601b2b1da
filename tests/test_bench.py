"""The benchmark command runs under mpiexec and reports what it promises (tiny shape); its --encode
mode measures tokenizers in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SHARED_MODELS, STORIES, run_mpiexec, write_random_model

KEYS = ("shape", "world_size", "budgets", "buffer_float_type", "decode_tokens_per_s", "prefill_tokens_per_s",
        "bandwidth_gb_s", "roofline_fraction", "bytes_sent_per_token", "compute_s_per_token",
        "collective_s_per_token", "peak_rss_mb", "time_to_first_token_s", "load_gb_s", "wait_s_per_token")


def test_bench_json_under_mpiexec(tmp_path):
    result = run_mpiexec(3, [sys.executable, "-m", "dllama_mpi.bench", "--shape", "tiny", "--memory-budget", "2", "1", "1",
                             "--buffer-float-type", "q80", "f32", "--prompt-lengths", "16", "40", "--decode-steps", "4",
                             "--repeat", "1", "--json"], timeout=300, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["buffer_float_type"] for r in lines] == ["q80", "f32"]
    for r in lines:
        assert all(k in r for k in KEYS), set(KEYS) - set(r)
        assert r["world_size"] == 3 and r["budgets"] == [2, 1, 1] and r["shape"] == "tiny"
        assert r["decode_tokens_per_s"] > 0 and set(r["prefill_tokens_per_s"]) == {"16", "40"}
        assert 0 < r["roofline_fraction"] < 1 and r["bandwidth_gb_s"] > 0
        assert len(r["bytes_sent_per_token"]) == len(r["peak_rss_mb"]) == len(r["collective_s_per_token"]) == 3
        assert all(b > 0 for b in r["bytes_sent_per_token"])
    # q80 buffers send fewer bytes than f32 (the tiny shape's vectors are whole blocks)
    assert sum(lines[0]["bytes_sent_per_token"]) < sum(lines[1]["bytes_sent_per_token"])


# --------------------------------------------------------------------- --encode

ENCODE_KEYS = ("vocab", "tokenizer", "kib", "chars", "tokens", "seconds", "tokens_per_s", "repeats")
SPM_GGUF = SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"
# main() in a fresh interpreter, which then tells whether mpi4py was imported (importing it initialises MPI)
MAIN_THEN_MPI = ("import sys; from dllama_mpi.bench import main; rc = main(sys.argv[1:]); "
                 "print('mpi4py' in sys.modules); sys.exit(rc)")


def test_bench_encode_json_one_process(tmp_path):
    from dllama_mpi.bench import SHAPES, encode_text, load_vocab

    vocabs = [write_random_model(tmp_path / "tiny.h5", SHAPES["tiny"])]
    vocabs += [p for p in (STORIES / "tok512.bin", SPM_GGUF) if p.exists()]  # the shared ones where present
    result = subprocess.run([sys.executable, "-c", MAIN_THEN_MPI, "--encode", *map(str, vocabs), "--encode-kib", "3",
                             "--repeat", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    *lines, mpi_imported = result.stdout.splitlines()
    assert mpi_imported == "False"
    rows = [json.loads(line) for line in lines]
    assert [r["vocab"] for r in rows] == list(map(str, vocabs))
    text = encode_text(3)
    assert 2.9 < len(text.encode()) / 1024 <= 3 and not text.isascii()
    for r, path in zip(rows, vocabs):
        assert all(k in r for k in ENCODE_KEYS), set(ENCODE_KEYS) - set(r)
        assert r["tokens"] == len(load_vocab(str(path)).encode(text))
        assert r["chars"] == len(text) and r["kib"] == len(text.encode()) / 1024 and r["repeats"] == 2
        assert r["seconds"] > 0 and r["tokens_per_s"] == r["tokens"] / r["seconds"]


def test_bench_encode_missing_vocab(tmp_path, capsys):
    from dllama_mpi.bench import main

    assert main(["--encode", str(tmp_path / "nowhere.bin")]) == 2
    assert capsys.readouterr().err.startswith("error: vocabulary ")


def test_bench_help_is_complete():
    from dllama_mpi.bench import parser

    p = parser()
    assert p.description.endswith("(one process, no mpirun).")  # a whole description, not a docstring's first line
    for action in p._actions:
        assert action.dest == "help" or "default" in action.help, action.dest


@pytest.mark.parametrize("option, value", [("--decode-steps", "0"), ("--prompt-lengths", "-5"), ("--nthreads", "0"),
                                           ("--repeat", "0"), ("--encode-kib", "1e9"), ("--encode-kib", "nan")])
def test_bench_refuses_values_it_cant_measure(option, value, capsys):
    from dllama_mpi.bench import parser

    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([option, value])
    assert exit_.value.code == 2 and f"argument {option}: must be" in capsys.readouterr().err
