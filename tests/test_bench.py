"""The benchmark command runs under mpiexec and reports what it promises (tiny shape, or a given
model file); its --encode mode measures tokenizers in one process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import SHARED_MODELS, STORIES, launcher_family, run_mpiexec, write_random_model

from dllama_mpi.commands.bench import BENCH_MODEL_VERSION

KEYS = ("shape", "world_size", "budgets", "buffer_float_type", "decode_tokens_per_s", "prefill_tokens_per_s",
        "bandwidth_gb_s", "roofline_fraction", "bytes_sent_per_token", "compute_s_per_token",
        "collective_s_per_token", "peak_rss_mb", "time_to_first_token_s", "load_gb_s", "wait_s_per_token",
        "model", "rows_per_step", "kernel_isa", "kv_type", "planned_mb")


@pytest.mark.jobs
def test_bench_json_under_mpiexec(tmp_path):
    result = run_mpiexec(3, [sys.executable, "-m", "dllama_mpi", "bench", "--shape", "tiny", "--memory-budget", "2", "1", "1",
                             "--buffer-float-type", "q80", "f32", "--prompt-lengths", "16", "40", "--decode-steps", "4",
                             "--repeat", "1", "--rows", "1", "3", "--json"], timeout=300,
                         env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["buffer_float_type"] for r in lines] == ["q80", "f32"]
    for r in lines:
        assert all(k in r for k in KEYS), set(KEYS) - set(r)
        assert r["world_size"] == 3 and r["budgets"] == [2, 1, 1] and r["shape"] == "tiny"
        assert r["model"].endswith(f"bench-tiny-q40-v{BENCH_MODEL_VERSION}.h5") and r["model"].startswith(str(tmp_path))
        assert [x["rows"] for x in r["rows_per_step"]] == [1, 3] and all(x["tok_s"] > 0 for x in r["rows_per_step"])
        assert r["kernel_isa"] in ("avx512vnni", "avx2", "portable") and r["kv_type"] == "f16"
        mpi = r["mpi"]  # which MPI measured it: the library the tests' launcher runs
        assert mpi["family"] == launcher_family() and mpi["version"] and "libmpi" in mpi["path"]
        assert mpi["text"].startswith(f"{mpi['library']} {mpi['version']} (") and "3 rank(s) started by" in mpi["text"]
        assert r["decode_tokens_per_s"] > 0 and set(r["prefill_tokens_per_s"]) == {"16", "40"}
        assert 0 < r["roofline_fraction"] < 1 and r["bandwidth_gb_s"] > 0
        assert len(r["bytes_sent_per_token"]) == len(r["peak_rss_mb"]) == len(r["collective_s_per_token"]) == 3
        assert all(b > 0 for b in r["bytes_sent_per_token"])
    # q80 buffers send fewer bytes than f32 (the tiny shape's vectors are whole blocks)
    assert sum(lines[0]["bytes_sent_per_token"]) < sum(lines[1]["bytes_sent_per_token"])


@pytest.mark.jobs
def test_bench_model_file_table(tmp_path):
    """--model measures a given file (here of a shape no --shape has), as a table, in the KV type asked for;
    --rows off by default."""
    from dllama_mpi.commands.bench import SHAPES

    spec = dataclasses.replace(SHAPES["tiny"], vocab_size=300, n_layers=2)
    model = write_random_model(tmp_path / "other.h5", spec)
    result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "bench", "--model", str(model), "--prompt-lengths", "12",
                             "--decode-steps", "3", "--repeat", "1", "--kv-type", "q8_0"], timeout=300,
                         env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{model}: 2 rank(s), budgets 1 1, buffers q80, KV cache q8_0, ") and ", kernels " in first
    assert "rows per step" not in result.stdout and "prefill 12 tokens: " in result.stdout
    assert result.stdout.splitlines()[1].startswith("  MPI: ") and "2 rank(s) started by" in result.stdout.splitlines()[1]
    assert not list(tmp_path.glob("dllama_mpi/bench-*.h5"))  # no shape's model written


@pytest.mark.jobs
def test_bench_decode_at_depths_and_a_depth_beyond_the_context(tmp_path):
    """--depths: decode after N tokens in the KV cache, for each N, in the JSON and the table; a depth
    whose measurement does not fit the model's context is refused before loading."""
    from dllama_mpi.commands.bench import SHAPES, largest_depth

    bench = [sys.executable, "-m", "dllama_mpi", "bench", "--shape", "tiny", "--prompt-lengths", "8",
             "--decode-steps", "3", "--repeat", "1"]
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    result = run_mpiexec(1, bench + ["--depths", "64", "0", "200", "--json"], timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    r = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert list(r["decode_tokens_per_s_at_depth"]) == ["0", "64", "200"]
    assert r["decode_tokens_per_s_at_depth"]["0"] == r["decode_tokens_per_s"]
    assert all(v > 0 for v in r["decode_tokens_per_s_at_depth"].values())

    deepest = largest_depth(SHAPES["tiny"].seq_len, 3)
    result = run_mpiexec(1, bench + ["--depths", str(deepest + 1)], timeout=300, env=env)
    assert result.returncode != 0 and "decode at depth" not in result.stdout
    assert (f"--depths {deepest + 1}: the model's context is {SHAPES['tiny'].seq_len} tokens" in result.stderr
            and f"give depths of at most {deepest}" in result.stderr), result.stderr


def test_bench_table_shows_decode_at_each_depth():
    from dllama_mpi.commands.bench import table

    r = {"shape": "tiny", "world_size": 1, "budgets": [1], "budgets_chosen": [1], "auto_predicted_ms_per_token": None,
         "buffer_float_type": "q80", "kv_type": "q8_0", "threads_per_rank": [2], "kernel_isa": "avx2", "decode_tokens_per_s": 50.0,
         "mpi": {"text": "MPICH 5.0.2 (/v/lib/libmpi.so.12); 1 rank(s) started by no launcher (one process)"},
         "roofline_fraction": 0.5, "weight_bytes_per_token": 1e6, "bandwidth_gb_s": 10.0,
         "prefill_tokens_per_s": {"8": 100.0}, "prefill_to_decode_ratio": {"8": 2.0}, "time_to_first_token_s": 1.0,
         "load_s": 0.1, "load_gb_s": 1.0, "rows_per_step": [], "compute_s_per_token": [0.01],
         "collective_s_per_token": [0.0], "wait_s_per_token": [0.0], "bytes_sent_per_token": [0.0],
         "peak_rss_mb": [100.0], "planned_mb": [50.0], "decode_tokens_per_s_at_depth": {"0": 50.0}}
    assert table(r).startswith("tiny: 1 rank(s), budgets 1, buffers q80, KV cache q8_0, threads [2], kernels avx2\n")
    assert "decode at depth" not in table(r)  # depth 0 alone: the decode line says it
    assert table(r).splitlines()[1] == "  MPI: MPICH 5.0.2 (/v/lib/libmpi.so.12); 1 rank(s) started by no launcher (one process)"
    deep = table({**r, "decode_tokens_per_s_at_depth": {"0": 50.0, "2048": 40.125}}).splitlines()
    assert "  decode at depth 0: 50.00, 2048: 40.12 tokens/s (tokens in the KV cache; 0: after the 8-token prompt)" in deep


# --------------------------------------------------------------------- --encode

ENCODE_KEYS = ("vocab", "tokenizer", "kib", "chars", "tokens", "seconds", "tokens_per_s", "repeats")
SPM_GGUF = SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"
# main() in a fresh interpreter, which then tells whether mpi4py was imported (importing it initialises MPI)
MAIN_THEN_MPI = ("import sys; from dllama_mpi.commands.bench import main; rc = main(sys.argv[1:]); "
                 "print('mpi4py' in sys.modules); sys.exit(rc)")


def test_bench_encode_json_one_process(tmp_path):
    from dllama_mpi.commands.bench import SHAPES, encode_text, load_vocab

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
    from dllama_mpi.commands.bench import main

    assert main(["--encode", str(tmp_path / "nowhere.bin")]) == 2
    assert capsys.readouterr().err.startswith("error: vocabulary ")


def test_bench_help_is_complete():
    from dllama_mpi.commands.bench import build_parser

    p = build_parser()
    assert p.description.endswith("(one process, no mpirun).")  # a whole description, not a docstring's first line
    for action in p._actions:
        assert action.dest == "help" or "default" in action.help, action.dest


@pytest.mark.parametrize("option, value", [("--decode-steps", "0"), ("--prompt-lengths", "-5"), ("--nthreads", "0"),
                                           ("--repeat", "0"), ("--encode-kib", "1e9"), ("--encode-kib", "nan"),
                                           ("--rows", "0"), ("--depths", "-1")])
def test_bench_refuses_values_it_cant_measure(option, value, capsys):
    from dllama_mpi.commands.bench import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([option, value])
    assert exit_.value.code == 2 and f"argument {option}: must be" in capsys.readouterr().err


def test_bench_model_and_shape_exclude_each_other(capsys):
    from dllama_mpi.commands.bench import build_parser

    assert build_parser().parse_args(["--model", "m.h5", "--rows", "1", "2", "4", "8"]).rows == [1, 2, 4, 8]
    assert build_parser().parse_args([]).rows is None  # the sweep is off by default
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--model", "m.h5", "--shape", "tiny"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_bench_reports_the_instruction_set_in_use():
    from dllama_mpi.commands.bench import kernel_isa
    from dllama_mpi.kernels import qmatmul

    assert kernel_isa() == qmatmul.ISA in qmatmul.host_isas()
