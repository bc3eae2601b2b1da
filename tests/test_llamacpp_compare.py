"""tools/llamacpp_compare.py's pure parts (no build, no llama.cpp): the commands, the run order,
llama-bench's JSON, the table (decode at depths too), --gguf's options and cache key, the idle
check's /proc parsing, and the GGUF it writes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

import llamacpp_compare as lc

pytestmark = pytest.mark.tools  # every test here runs a tool of tools/

gguf = pytest.importorskip("gguf")

# `llama-bench -m models/tinyllama-1.1b-q4_0-seed0-v1.gguf -t 2 -p 128 -n 32 -r 1 -o json` (stdout), llama-cpp-python
# 0.3.36's llama.cpp as the tool builds it, on this project's 2-core machine (captured 2026-11-30)
LLAMA_BENCH_JSON = """\
[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "models/tinyllama-1.1b-q4_0-seed0-v1.gguf",
    "model_type": "llama 1B Q4_0",
    "model_size": 619094016,
    "model_n_params": 1100048384,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 128,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-30T20:16:08Z",
    "avg_ns": 1676050324,
    "stddev_ns": 0,
    "avg_ts": 76.370022,
    "stddev_ts": 0.000000,
    "samples_ns": [ 1676050324 ],
    "samples_ts": [ 76.37 ]
  },
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "models/tinyllama-1.1b-q4_0-seed0-v1.gguf",
    "model_type": "llama 1B Q4_0",
    "model_size": 619094016,
    "model_n_params": 1100048384,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 0,
    "test_time": "2026-11-30T20:16:12Z",
    "avg_ns": 2365878345,
    "stddev_ns": 0,
    "avg_ts": 13.525632,
    "stddev_ts": 0.000000,
    "samples_ns": [ 2365878345 ],
    "samples_ts": [ 13.5256 ]
  }
]
"""




def llama_bench_json_at_depths(depths: list[int]) -> str:
    """LLAMA_BENCH_JSON as `-d` makes it: for each depth a pp row and a tg row carrying that n_depth (llama-bench
    measures prefill at each depth too), with made-up speeds that fall with depth."""
    pp, tg = json.loads(LLAMA_BENCH_JSON)
    rows = []
    for d in depths:
        rows += [{**pp, "n_depth": d, "avg_ts": pp["avg_ts"] / (1 + d / 1024)},
                 {**tg, "n_depth": d, "avg_ts": tg["avg_ts"] / (1 + d / 1024)}]
    return json.dumps(rows)


# --------------------------------------------------------------------- commands and order


def test_build_commands_make_only_llama_bench_and_llama_quantize_natively(tmp_path):
    configure = lc.cmake_configure_command(tmp_path / "src", tmp_path / "build", "Ninja")
    assert configure[:7] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build"), "-G", "Ninja"]
    for flag in ("-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"):
        assert flag in configure
    assert "-G" not in lc.cmake_configure_command(tmp_path, tmp_path)
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # ggml's AMX path dies of SIGILL (see X86_NO_AMX)
    assert lc.cmake_flags("x86_64")[-2:] == [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    assert not any("amx" in f for f in lc.cmake_flags("aarch64"))
    assert lc.cmake_build_command(tmp_path, 2) == ["cmake", "--build", str(tmp_path), "--config", "Release",
                                                   "--target", "llama-bench", "llama-quantize", "-j", "2"]
    assert lc.quantize_command(tmp_path / "q", tmp_path / "a.gguf", tmp_path / "b.gguf", 2) == [
        str(tmp_path / "q"), "--allow-requantize", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "Q4_K_M", "2"]
    gguf_path, h5_path = lc.model_paths(tmp_path, "tiny", 3, "q4_k_m")
    assert gguf_path.name == f"tiny-q4_k_m-seed3-v{lc.GGUF_MODEL_VERSION}.gguf"
    assert h5_path.name == f"tiny-q4_k_m-seed3-v{lc.GGUF_MODEL_VERSION}-c{lc.CONVERSION_VERSION}.h5"  # a new converter re-converts
    assert lc.niced(["make"], 19) == ["nice", "-n", "19", "make"] and lc.niced(["make"], 0) == ["make"]
    download = lc.download_command("0.3.36", tmp_path, python="py")
    assert download == ["py", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python==0.3.36",
                        "-d", str(tmp_path)]
    assert lc.LLAMA_CPP_PYTHON_VERSION in str(lc.default_cache_dir())


def test_a_build_is_reused_only_with_the_same_flags(tmp_path):
    assert lc.built_with(tmp_path) is None
    (tmp_path / "build.json").write_text(json.dumps({"version": "0.3.36", "flags": lc.cmake_flags()}))
    assert lc.built_with(tmp_path) == lc.cmake_flags()
    binary = lc.llama_bench_path(tmp_path)
    binary.parent.mkdir()
    binary.write_text("")
    lc.llama_quantize_path(tmp_path).write_text("")
    assert lc.build_llama_bench(tmp_path, "0.3.36", jobs=1, niceness=0) == binary  # nothing to build
    (tmp_path / "build.json").write_text("{")
    assert lc.built_with(tmp_path) is None


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert lc.default_cache_dir("9.9.9") == tmp_path / "dllama_mpi" / "llama.cpp" / "9.9.9"
    assert lc.llama_bench_path(tmp_path) == tmp_path / "bin" / "llama-bench"


def test_run_commands(tmp_path):
    g, h = tmp_path / "m.gguf", tmp_path / "m.h5"
    assert lc.llama_bench_command(Path("/c/llama-bench"), g, 2) == [
        "/c/llama-bench", "-m", str(g), "-t", "2", "-p", "128", "-n", "32", "-r", "1", "-o", "json", "-ctk", "f16",
        "-ctv", "f16"]
    assert lc.ours_command("mpiexec", h, ["3", "2", "2", "1"], python="py") == [
        "mpiexec", "-n", "4", "py", "-m", "dllama_mpi", "bench", "--model", str(h), "--memory-budget", "3", "2", "2", "1",
        "--prompt-lengths", "128", "--decode-steps", "32", "--repeat", "1", "--kv-type", "f16", "--json"]
    assert lc.ours_command("mpiexec", h, ["1"], python="py", nthreads=2)[-2:] == ["--nthreads", "2"]
    # depth 0 alone leaves the commands as they were; deeper depths go to llama-bench's -d and our --depths
    assert lc.llama_bench_command(Path("b"), g, 2, [0]) == lc.llama_bench_command(Path("b"), g, 2)
    assert lc.llama_bench_command(Path("b"), g, 2, [0, 2048, 8192])[-2:] == ["-d", "0,2048,8192"]
    assert lc.ours_command("mpiexec", h, ["1"], python="py", depths=[0]) == lc.ours_command("mpiexec", h, ["1"], python="py")
    assert lc.ours_command("mpiexec", h, ["1"], python="py", nthreads=2, depths=[0, 2048])[-5:] == [
        "--depths", "0", "2048", "--nthreads", "2"]
    assert lc.parse_configs(["1", "1-1", "3-2-2-1"]) == [["1"], ["1", "1"], ["3", "2", "2", "1"]]
    with pytest.raises(ValueError, match="joined by '-'"):
        lc.parse_configs(["3--1"])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_the_kv_type_is_the_same_on_both_sides(tmp_path, kv_type):
    """--kv-type goes to our bench as itself and to llama-bench as -ctk and -ctv of ggml's same-named type;
    every type the bench takes has its llama.cpp twin."""
    from dllama_mpi.commands.bench import build_parser
    from dllama_mpi.model import quant

    assert set(lc.LLAMA_KV_TYPES) == set(quant.KV_TYPES)
    llama = lc.llama_bench_command(Path("b"), tmp_path / "m.gguf", 2, [0, 2048], kv_type)
    assert llama[llama.index("-ctk") + 1] == llama[llama.index("-ctv") + 1] == kv_type
    ours = lc.ours_command("mpiexec", tmp_path / "m.h5", ["1"], python="py", kv_type=kv_type)
    assert build_parser().parse_args(ours[7:]).kv_type == kv_type
    assert lc.parser().parse_args(["--kv-type", kv_type]).kv_type == kv_type
    assert lc.parser().parse_args([]).kv_type == "f16"


def test_the_commands_parse_under_the_bench_and_the_converter(tmp_path):
    """Our run command is one the bench's parser takes, and the converter's is its console script or module."""
    from dllama_mpi.commands.bench import build_parser

    command = lc.ours_command("mpiexec", tmp_path / "m.h5", ["1", "1"], python="py", depths=[0, 2048])
    assert command[3:7] == ["py", "-m", "dllama_mpi", "bench"]
    args = build_parser().parse_args(command[7:])
    assert args.model == str(tmp_path / "m.h5") and args.memory_budget == ["1", "1"] and args.json
    assert args.prompt_lengths == [128] and args.decode_steps == 32 and args.repeat == 1 and args.depths == [0, 2048]
    convert = lc.convert_command(tmp_path / "a.gguf", tmp_path / "a.h5")
    assert convert[-2:] == [str(tmp_path / "a.gguf"), str(tmp_path / "a.h5")]
    assert convert[0].endswith("dllama-mpi-convert") or convert[1:3] == ["-m", "dllama_mpi", "convert"]


def test_runs_are_interleaved():
    assert lc.schedule(["1", "1-1"], 3) == [
        (0, "llama.cpp", "-"), (0, "dllama_mpi", "1"), (0, "dllama_mpi", "1-1"),
        (1, "llama.cpp", "-"), (1, "dllama_mpi", "1"), (1, "dllama_mpi", "1-1"),
        (2, "llama.cpp", "-"), (2, "dllama_mpi", "1"), (2, "dllama_mpi", "1-1")]
    assert lc.schedule(["1"], 0) == []


# --------------------------------------------------------------------- outputs


def test_parse_llama_bench_json_of_a_real_run():
    r = lc.parse_llama_bench(LLAMA_BENCH_JSON)
    rows = json.loads(LLAMA_BENCH_JSON)
    assert r["prefill"] == next(x["avg_ts"] for x in rows if x["n_prompt"] == 128) > 0
    assert r["decode"] == next(x["avg_ts"] for x in rows if x["n_gen"] == 32) > 0
    assert r["n_prompt"] == 128 and r["n_gen"] == 32 and r["threads"] == 2 and r["build_commit"] == "unknown"  # an sdist
    assert r["model_type"] == "llama 1B Q4_0" and r["cpu_info"] == "Intel(R) Xeon(R) Processor"
    assert r["decode_at_depth"] == {"0": r["decode"]}
    with pytest.raises(ValueError, match=r"one pp row at depth 0 and one tg row at each depth of \[0\], found 1 pp "
                                         r"row\(s\) at depth 0 and tg rows at depths \[\]"):
        lc.parse_llama_bench(json.dumps(rows[:1]))


def test_parse_llama_bench_json_at_depths():
    text = llama_bench_json_at_depths([0, 2048, 8192])
    tg = {x["n_depth"]: x["avg_ts"] for x in json.loads(text) if x["n_gen"]}
    r = lc.parse_llama_bench(text, [0, 2048, 8192])
    assert r["decode_at_depth"] == {"0": tg[0], "2048": tg[2048], "8192": tg[8192]} and r["decode"] == tg[0]
    assert r["prefill"] == json.loads(LLAMA_BENCH_JSON)[0]["avg_ts"]  # depth 0's, not the deeper pp rows'
    with pytest.raises(ValueError, match=r"each depth of \[0, 2048, 4096\], found 1 pp row\(s\) at depth 0 and tg "
                                         r"rows at depths \[0, 2048, 8192\]"):
        lc.parse_llama_bench(text, [0, 2048, 4096])


def test_parse_our_bench_json():
    line = json.dumps({"decode_tokens_per_s": 10.5, "prefill_tokens_per_s": {"128": 30.25}, "kernel_isa": "avx2",
                       "threads_per_rank": [2], "world_size": 1, "decode_tokens_per_s_at_depth": {"0": 10.5}})
    r = lc.parse_ours("loading ...\n" + line + "\n")
    assert (r["decode"], r["prefill"], r["kernel_isa"], r["world_size"]) == (10.5, 30.25, "avx2", 1)
    assert r["decode_at_depth"] == {"0": 10.5}
    no_isa = json.dumps({"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": {"128": 2.0},
                         "decode_tokens_per_s_at_depth": {"0": 1.0}})
    assert lc.parse_ours(no_isa)["kernel_isa"] == "unknown"
    with pytest.raises(ValueError, match="no JSON line"):
        lc.parse_ours("error: something\n")


def test_parse_our_bench_json_at_depths():
    line = json.dumps({"decode_tokens_per_s": 10.5, "prefill_tokens_per_s": {"128": 30.25},
                       "decode_tokens_per_s_at_depth": {"0": 10.5, "2048": 8.0, "8192": 5.5}})
    assert lc.parse_ours(line, [0, 2048, 8192])["decode_at_depth"] == {"0": 10.5, "2048": 8.0, "8192": 5.5}
    with pytest.raises(ValueError, match=r"expected decode at depths \[0, 4096\], found it at \[0, 2048, 8192\]"):
        lc.parse_ours(line, [0, 4096])
    without = json.dumps({"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": {"128": 2.0}})
    with pytest.raises(ValueError, match=r"expected decode at depths \[0\], found it at \[\]"):
        lc.parse_ours(without)


def _rows(system: str, config: str, runs) -> list[dict]:
    """Parsed runs of (decode, prefill) at depth 0 only, as the default invocation makes them."""
    return [{"system": system, "config": config, "decode": d, "prefill": p, "decode_at_depth": {"0": d}} for d, p in runs]


def test_medians_ranges_and_ratios_table():
    rows = _rows("llama.cpp", "-", ((20, 100), (22, 90), (21, 95)))
    rows += _rows("dllama_mpi", "1", ((10, 40), (11, 50), (9, 45)))
    rows += _rows("dllama_mpi", "1-1", ((7, 30), (8, 38)))
    summary = lc.summarize(rows)
    assert [(s["system"], s["config"], s["runs"]) for s in summary] == [
        ("llama.cpp", "-", 3), ("dllama_mpi", "1", 3), ("dllama_mpi", "1-1", 2)]
    assert summary[0]["decode"] == {"median": 21, "min": 20, "max": 22} and summary[0]["decode_ratio"] == 1
    assert summary[1]["decode_ratio"] == 10 / 21 and summary[1]["prefill_ratio"] == 45 / 95
    assert summary[2]["decode"]["median"] == 7.5 and summary[2]["prefill_ratio"] == 34 / 95
    table = lc.markdown_table(summary).splitlines()
    assert table[0] == ("| config | decode tok/s median (min-max) | prefill-128 tok/s median (min-max) | decode ratio "
                        "| prefill ratio |")
    assert table[1] == "|---|---|---|---|---|"
    assert table[2] == "| llama.cpp | 21.00 (20.00-22.00) | 95.00 (90.00-100.00) | 1.00 | 1.00 |"
    assert table[3] == "| dllama_mpi 1 | 10.00 (9.00-11.00) | 45.00 (40.00-50.00) | 0.48 | 0.47 |"
    assert table[4] == "| dllama_mpi 1-1 | 7.50 (7.00-8.00) | 34.00 (30.00-38.00) | 0.36 | 0.36 |"
    facts = {"cpu": "Some CPU", "cores": 2, "kernel_isa": "avx512", "shape": "tiny", "seed": 0, "version": "0.3.36",
             "llama_build": "abc", "llama_threads": 2, "our_threads": None, "repeat": 3, "idle": False, "kv_type": "f16"}
    text = lc.report(summary, facts)
    assert text.startswith("CPU: Some CPU (2 cores); our kernels' instruction set: avx512\n")
    assert "MACHINE NOT IDLE" in text and text.endswith("\n".join(table))
    assert "runs had another process" not in text and "AMX" not in text
    assert "0.3.36 (build abc) without AMX (see X86_NO_AMX), 2 threads;" in lc.report(summary, {**facts, "no_amx": True})
    assert "; KV cache q8_0 on both (llama-bench -ctk/-ctv, our --kv-type);" in lc.report(summary, {**facts, "kv_type": "q8_0"})
    assert "; 2 of 8 runs had another process above the idle threshold beside them\n" in lc.report(
        summary, {**facts, "disturbed_runs": 2, "runs": 8})
    without = lc.summarize(rows[3:])  # no llama.cpp row: no ratios
    assert without[0]["decode_ratio"] is None and lc.markdown_table(without).splitlines()[2].endswith("| - | - |")


def test_decode_at_depths_summary_table_and_report():
    def runs(system, config, values):  # (decode at depth 0, at 2048, prefill)
        return [{"system": system, "config": config, "decode": d0, "prefill": p, "decode_at_depth": {"0": d0, "2048": d}}
                for d0, d, p in values]

    rows = runs("llama.cpp", "-", ((20, 16, 100), (22, 18, 90))) + runs("dllama_mpi", "1", ((10, 4, 40), (12, 6, 50)))
    summary = lc.summarize(rows)
    assert summary[1]["decode_at_depth"]["2048"] == {"median": 5, "min": 4, "max": 6}
    assert summary[1]["decode_ratio_at_depth"] == {"0": 11 / 21, "2048": 5 / 17} and summary[1]["decode_ratio"] == 11 / 21
    assert summary[0]["decode_ratio_at_depth"] == {"0": 1, "2048": 1}
    table = lc.markdown_table(summary).splitlines()
    assert table[0].endswith("| prefill ratio | decode @ d2048 tok/s median (min-max) | decode ratio @ d2048 |")
    assert table[1] == "|---|---|---|---|---|---|---|"
    assert table[3] == "| dllama_mpi 1 | 11.00 (10.00-12.00) | 45.00 (40.00-50.00) | 0.52 | 0.47 | 5.00 (4.00-6.00) | 0.29 |"
    facts = {"cpu": "Some CPU", "cores": 2, "kernel_isa": "avx512", "shape": None, "seed": None, "quant": None,
             "gguf": "/models/llama.gguf", "version": "0.3.36", "llama_build": "unknown", "llama_threads": 2,
             "our_threads": None, "repeat": 2, "idle": True, "depths": [0, 2048], "skipped_depths": [8192],
             "seq_len": 4096, "kv_type": "f16"}
    head = lc.report(summary, facts).splitlines()[1]
    assert head.startswith("model /models/llama.gguf (converted with dllama-mpi-convert's defaults); llama.cpp from ")
    assert "; decode @ dN: after N tokens in the KV cache (llama-bench -d; ours: bench --depths" in head
    assert head.endswith("; depth(s) 8192 skipped: a decode measurement at depth N needs N + 33 tokens of the "
                         "model's 4096-token context")


def test_depths_beyond_the_context_are_skipped():
    from dllama_mpi.commands.bench import largest_depth

    assert lc.split_depths([0], 2048) == ([0], [])
    assert lc.split_depths([8192, 2048], 4096) == ([0, 2048], [8192])  # depth 0 always, sorted
    deepest = largest_depth(2048, lc.GEN_TOKENS)
    assert lc.split_depths([deepest, deepest + 1], 2048) == ([0, deepest], [deepest + 1])


def test_cpu_model_name():
    assert lc.cpu_model_name("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n") \
        == "Intel(R) Xeon(R) Processor"
    assert lc.cpu_model_name("processor : 0\n") == "unknown"
    assert lc.cpu_model_name() != ""


# --------------------------------------------------------------------- idle check


STAT_PYTHON = "1234 (python3) S 1 1234 1234 0 -1 4194560 2000 0 0 0 150 30 0 0 20 0 3 0 900 1000000 5000 0 0"
STAT_ODD = "77 (a) b (c)) R 1 77 77 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0 900 1000000 5000 0 0"


def test_proc_stat_lines_parse():
    assert lc.parse_pid_stat(STAT_PYTHON) == ("python3", 180)
    assert lc.parse_pid_stat(STAT_ODD) == ("a) b (c)", 10)  # a name with spaces and parentheses
    sample = lc.cpu_sample()
    assert sample and all(isinstance(t, int) and t >= 0 for _, t in sample.values())


def test_busy_processes_from_two_samples():
    before = {1: ("idle", 100), 2: ("make", 1000), 3: ("cc1plus", 50)}
    after = {1: ("idle", 102), 2: ("make", 1150), 4: ("new", 30), 3: ("cc1plus", 10)}  # pid 3 reused
    busy = lc.busy_processes(before, after, seconds=2.0, threshold_pct=10, ticks_per_s=100)
    assert busy == [(2, "make", 75.0), (4, "new", 15.0)]  # 1 at 1% is quiet; 3's 10 ticks = 5%
    assert lc.busy_processes(before, before, 1.0, 10, 100) == []


def test_gguf_option_replaces_the_random_model(tmp_path, capsys):
    p = lc.parser()
    args = p.parse_args([])
    lc.model_options(p, args)
    assert (args.shape, args.seed, args.quant, args.gguf, args.depth) == ("tinyllama-1.1b", 0, "q4_0", None, [0])
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    args = p.parse_args(["--gguf", str(model), "--depth", "0", "2048", "8192"])
    lc.model_options(p, args)
    assert (args.shape, args.seed, args.quant, args.gguf, args.depth) == (None, None, None, model, [0, 2048, 8192])
    for given, said in ((["--seed", "0"], "--seed: "), (["--shape", "tiny", "--quant", "q4_0"], "--shape --quant: ")):
        args = p.parse_args(["--gguf", str(model), *given])
        with pytest.raises(SystemExit):
            lc.model_options(p, args)
        assert said + "these choose the random model's weights, and --gguf measures" in capsys.readouterr().err
    for path, found in ((tmp_path / "nowhere.gguf", "nothing"), (tmp_path, "a directory")):
        with pytest.raises(SystemExit):
            lc.model_options(p, p.parse_args(["--gguf", str(path)]))
        assert f"--gguf {path}: expected a GGUF file, found {found} there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--depth", "-1"])
    assert "argument --depth: must be a whole number" in capsys.readouterr().err


def test_a_given_gguf_is_converted_again_only_when_it_changes(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF one")
    key = lc.given_model_path(tmp_path / "cache", model)
    assert key.parent == tmp_path / "cache" / "models" / "given" and key.name.startswith("model-8-")
    assert key.name.endswith(f"-c{lc.CONVERSION_VERSION}.h5") and lc.given_model_path(tmp_path / "cache", model) == key
    model.write_bytes(b"GGUF two!")  # another size
    assert lc.given_model_path(tmp_path / "cache", model) != key
    stat = model.stat()
    touched = lc.given_model_path(tmp_path / "cache", model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, modified again
    assert lc.given_model_path(tmp_path / "cache", model) != touched


@pytest.mark.parametrize("option", ["--repeat", "--threads", "--nthreads", "--build-jobs"])
def test_counts_must_be_positive(option, capsys):
    with pytest.raises(SystemExit):
        lc.parser().parse_args([option, "0"])
    assert f"argument {option}: must be" in capsys.readouterr().err


def test_wait_for_idle_zero_seconds_is_immediate():
    assert lc.wait_for_idle(0, 10, 1) is True


# --------------------------------------------------------------------- the GGUF


def test_spm_vocab_is_unique_and_typed():
    tokens, scores, types = lc.spm_vocab(1024)
    assert len(tokens) == len(scores) == len(types) == 1024 and len(set(tokens)) == 1024
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>" and types[3 + 10] == lc.TOKEN_BYTE
    assert len(set(lc.spm_vocab(32000)[0])) == 32000
    with pytest.raises(ValueError):
        lc.spm_vocab(259)


def test_gguf_of_a_tiny_shape_reads_back_and_converts_bit_exact(tmp_path):
    from dllama_mpi.commands.bench import SHAPES
    from dllama_mpi.files.modelfile import ModelFile

    spec = SHAPES["tiny"]
    gguf_path, h5_path = lc.prepare_models(tmp_path, "tiny", seed=3)
    assert (gguf_path, h5_path) == lc.model_paths(tmp_path, "tiny", 3) and h5_path.exists()
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert list(tensors) == [name for name, _, _ in lc.gguf_tensors(spec)]
    assert len(tensors) == 2 + 9 * spec.n_layers + (0 if spec.shared_classifier else 1)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            assert t.tensor_type == Q.F32 and list(t.shape) == [spec.dim]
        else:
            assert t.tensor_type == Q.Q4_0, name
    assert list(tensors["token_embd.weight"].shape) == [spec.dim, spec.vocab_size]  # GGUF lists ne: row length first
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [spec.hidden_dim, spec.dim]
    assert list(tensors["blk.1.attn_k.weight"].shape) == [spec.dim, spec.n_kv_heads * spec.head_dim]
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]) == b"llama"
    assert reader.get_field("llama.block_count").parts[-1][0] == spec.n_layers
    assert reader.get_field("tokenizer.ggml.model") is not None

    model = ModelFile(h5_path)
    try:
        assert model.spec.dim == spec.dim and model.spec.n_layers == spec.n_layers
        assert model.spec.vocab_size == spec.vocab_size and model.spec.weight_type == "q40"
        for ours, theirs in (("tok_embeddings", "token_embd.weight"), ("layers/2/w2", "blk.2.ffn_down.weight"),
                             ("layers/0/wq", "blk.0.attn_q.weight")):
            stored = model.read(ours)
            assert stored.view(np.uint8).tobytes() == np.asarray(tensors[theirs].data).tobytes(), ours
        assert np.array_equal(model.read("layers/3/ffn_norm"), np.asarray(tensors["blk.3.ffn_norm.weight"].data))
        assert model.tokenizer().vocab_size == spec.vocab_size
    finally:
        model.close()
    mtimes = gguf_path.stat().st_mtime_ns, h5_path.stat().st_mtime_ns
    assert lc.prepare_models(tmp_path, "tiny", seed=3) == (gguf_path, h5_path)  # cached: not written again
    assert (gguf_path.stat().st_mtime_ns, h5_path.stat().st_mtime_ns) == mtimes
    assert lc.model_context(h5_path) == spec.seq_len
    # the same file given with --gguf: converted into its own cache entry, once
    given, given_h5 = lc.prepare_given_model(tmp_path / "given-cache", Path(os.path.relpath(gguf_path)))
    assert given == gguf_path.resolve() and given_h5 == lc.given_model_path(tmp_path / "given-cache", gguf_path)
    assert lc.model_context(given_h5) == spec.seq_len
    converted_at = given_h5.stat().st_mtime_ns
    assert lc.prepare_given_model(tmp_path / "given-cache", gguf_path)[1].stat().st_mtime_ns == converted_at
    other, _ = lc.model_paths(tmp_path, "tiny", 4)
    assert other != gguf_path


def test_gguf_seed_decides_the_weights(tmp_path):
    from dllama_mpi.model.spec import ModelSpec

    small = ModelSpec(dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=300,
                      seq_len=64, weight_type="q40", shared_classifier=False)
    a, b, c = (lc.write_gguf(tmp_path / f"{n}.gguf", small, seed) for n, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    names = [t.name for t in gguf.GGUFReader(a).tensors]
    assert names[-1] == "output.weight" and "output.weight" not in [n for n, _, _ in lc.gguf_tensors(
        dataclasses.replace(small, shared_classifier=True))]
    assert not list(tmp_path.glob("*.tmp"))


def test_moe_gguf_is_qwen3moe_and_converts_with_its_experts(tmp_path):
    """A qwen3moe GGUF as llama.cpp's loader reads it (expert counts and width, q and k norms, an F32 router, each
    FFN matrix of every expert as one 3-D Q4_0 tensor), converted by ours: the spec's experts read back, each
    expert's blocks bit-exact, the router kept, and routing varied (random normal, not near-uniform, logits)."""
    from dllama_mpi.commands.bench import SHAPES
    from dllama_mpi.files.modelfile import ModelFile

    spec = SHAPES["tiny-moe"]
    assert lc.gguf_arch(spec) == "qwen3moe" and spec.n_experts > spec.n_experts_used > 1
    gguf_path, h5_path = lc.prepare_models(tmp_path, "tiny-moe", seed=5)
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert list(tensors) == [name for name, _, _ in lc.gguf_tensors(spec)]
    assert len(tensors) == 3 + 12 * spec.n_layers  # 5 attention, 2 q/k norms, 2 norms, a router, 3 expert tensors
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]) == b"qwen3moe"
    for key, value in (("expert_count", spec.n_experts), ("expert_used_count", spec.n_experts_used),
                       ("expert_feed_forward_length", spec.hidden_dim), ("block_count", spec.n_layers)):
        assert reader.get_field(f"qwen3moe.{key}").parts[-1][0] == value, key
    assert reader.get_field("qwen3moe.feed_forward_length") is None
    E, H, D = spec.n_experts, spec.hidden_dim, spec.dim
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert list(tensors["blk.1.ffn_gate_inp.weight"].shape) == [D, E]  # ne: row length first
    for name, ne in (("ffn_gate_exps", [D, H, E]), ("ffn_up_exps", [D, H, E]), ("ffn_down_exps", [H, D, E])):
        t = tensors[f"blk.2.{name}.weight"]
        assert t.tensor_type == Q.Q4_0 and list(t.shape) == ne, name
    assert list(tensors["blk.0.attn_q_norm.weight"].shape) == list(tensors["blk.0.attn_k_norm.weight"].shape) == [
        spec.head_dim]

    model = ModelFile(h5_path)
    try:
        ours = model.spec
        assert (ours.architecture, ours.n_experts, ours.n_experts_used, ours.expert_weights_norm) == (
            "qwen3moe", E, spec.n_experts_used, True)
        assert (ours.hidden_dim, ours.qk_norm, ours.weight_type) == (H, True, "q40")
        down = np.asarray(tensors["blk.2.ffn_down_exps.weight"].data)
        assert down.shape[0] == E
        for e in (0, E - 1):
            assert model.read(f"layers/2/experts/{e}/w2").view(np.uint8).tobytes() == down[e].tobytes(), e
        router = model.read("layers/1/router")
        assert np.array_equal(router, np.asarray(tensors["blk.1.ffn_gate_inp.weight"].data))
    finally:
        model.close()
    logits = router @ np.random.default_rng(0).standard_normal((D, 64)).astype(np.float32)
    assert 0.5 < logits.std() < 2 and len(set(logits.argmax(axis=0))) > E // 2


def test_mixtral_is_llama_with_experts_and_other_architectures_are_refused():
    from dllama_mpi.commands.bench import SHAPES

    moe = SHAPES["tiny-moe"]
    mixtral = dataclasses.replace(moe, architecture="mixtral", qk_norm=False)
    names = [name for name, _, _ in lc.gguf_tensors(mixtral)]
    assert lc.gguf_arch(mixtral) == "llama" and "blk.0.ffn_up_exps.weight" in names
    assert "blk.0.attn_q_norm.weight" not in names and "blk.0.ffn_up.weight" not in names
    w = gguf.GGUFWriter(None, "llama")
    lc.add_llama_metadata(w, mixtral)
    keys = set(w.kv_data[0])
    assert {"llama.expert_count", "llama.expert_used_count", "llama.feed_forward_length"} <= keys
    assert "llama.expert_feed_forward_length" not in keys
    assert lc.gguf_arch(SHAPES["tiny"]) == "llama" and "blk.0.ffn_up.weight" in [n for n, _, _ in
                                                                                lc.gguf_tensors(SHAPES["tiny"])]
    with pytest.raises(ValueError, match="mixtral"):
        lc.gguf_arch(dataclasses.replace(moe, architecture="qwen3"))
    with pytest.raises(ValueError, match="qk_norm"):
        lc.gguf_arch(dataclasses.replace(moe, qk_norm=False))


def test_runs_capture_stdout_and_end_whole_sessions(tmp_path):
    assert lc.run_capture(["sh", "-c", "echo out; echo err >&2"], timeout=30) == ("out\n", "err\n")
    with pytest.raises(SystemExit, match=r"(?s)err\n.*failed \(exit code 3\)"):
        lc.run_capture(["sh", "-c", "echo err >&2; exit 3"], timeout=30)
    with pytest.raises(SystemExit, match=r"failed \(killed by SIGILL\)"):
        lc.run_capture(["sh", "-c", "kill -ILL $$"], timeout=30)
    marker = tmp_path / "survived"
    with pytest.raises(subprocess.TimeoutExpired):  # the child of the shell goes too
        lc.run_capture(["sh", "-c", f"(sleep 2; touch {marker}) & wait"], timeout=0.5)
    time.sleep(2.5)
    assert not marker.exists()


def test_greedy_tools_padded_stories260k_is_the_same_model(tmp_path):
    """tools/greedy_vs_llamacpp.py's trained model for k-quants: stories260K zero-padded to 256-wide rows
    gives stories260K's logits (f32 rounding apart: RMSNorm sums 4x the width) and its greedy text."""
    from conftest import STORIES, convert_stories, need_stories

    from dllama_mpi.files.convert import convert
    from greedy_vs_llamacpp import padded_stories_gguf

    need_stories()
    padded_stories_gguf(tmp_path / "padded.gguf", STORIES / "stories260K.bin", STORIES / "tok512.bin")
    convert(tmp_path / "padded.gguf", tmp_path / "padded.h5", None, "f32")
    tokens = [1, 403, 407, 261, 378, 432, 383, 286]  # BOS "Once upon a time, there was"
    padded = _dump(tmp_path / "padded.h5", tmp_path / "p.npz", tokens)
    original = _dump(convert_stories(tmp_path, "f32"), tmp_path / "o.npz", tokens)
    assert padded["logits"].shape == original["logits"].shape == (len(tokens), 512)
    # at most 6.7e-6 apart measured; 1e-4 of the largest logit allowed
    np.testing.assert_allclose(padded["logits"], original["logits"], rtol=0, atol=1e-4 * np.abs(original["logits"]).max())
    assert padded["greedy"].tolist() == original["greedy"].tolist()


def _dump(model: Path, out: Path, tokens: list[int]) -> dict:
    import sys

    subprocess.run([sys.executable, str(REPO / "tests" / "engine_dump.py"), str(model), str(out), "--budgets", "1",
                    "--tokens", *map(str, tokens), "--steps", "24"], check=True, capture_output=True, timeout=120)
    return dict(np.load(out))


def test_greedy_tool_reads_llama_cpp_session_ids(tmp_path):
    """--gguf's llama.cpp ids: a session file's header (llama.h's magic and version 10, a count, int32 ids, then the
    state, ignored) and the prompt length llama-completion --verbose-prompt logs; another file is refused."""
    from greedy_vs_llamacpp import SESSION_MAGIC, prompt_count, session_tokens

    path = tmp_path / "session.bin"
    path.write_bytes(np.array([SESSION_MAGIC, 10, 3], np.uint32).tobytes() + np.array([785, 6722, 151643], np.int32).tobytes()
                     + b"state")
    assert session_tokens(path) == [785, 6722, 151643]
    path.write_bytes(np.array([SESSION_MAGIC, 9, 0], np.uint32).tobytes())
    with pytest.raises(SystemExit, match="version 9"):
        session_tokens(path)
    assert prompt_count("0.01.063.557 I llama_completion: number of tokens in prompt = 4\n") == 4
    with pytest.raises(SystemExit, match="no prompt length"):
        prompt_count("")


def test_greedy_tool_compares_steps():
    """compare_greedy: equal steps up to the first divergence, our margins there (top-1 over top-2, ours over
    llama.cpp's token), and llama.cpp's early stop at an end-of-generation token, equal where ours takes one."""
    from dllama_mpi.serving.request import TokenLogprob
    from greedy_vs_llamacpp import compare_greedy, llama_greedy_command

    def step(*top):  # (token, log-probability), most likely first
        return TokenLogprob(top[0][0], top[0][1], top)

    steps = [step((5, -0.1), (6, -2.0)), step((7, -0.5), (8, -0.55), (9, -3.0)), step((2, -0.2), (3, -4.0))]
    same = compare_greedy([5, 7, 2], steps, (2,), 3)
    assert (same["equal"], same["compared"], same["divergence"]) == (3, 3, None)
    assert same["our_margins"] == pytest.approx([1.9, 0.05, 3.8])
    split = compare_greedy([5, 8, 1], steps, (2,), 3)
    assert split["equal"] == 1
    assert split["divergence"]["step"] == 1 and split["divergence"]["ours"] == 7 and split["divergence"]["llama"] == 8
    assert split["divergence"]["our_margin_over_llama"] == pytest.approx(0.05) and split["divergence"]["llama_rank_in_ours"] == 2
    far = compare_greedy([5, 4, 1], steps, (2,), 3)["divergence"]
    assert far["our_margin_over_llama"] is None and far["llama_rank_in_ours"] is None  # not in our top
    ended = compare_greedy([5, 7], steps, (2,), 3)  # llama.cpp stopped at an end-of-generation token; ours took 2
    assert (ended["equal"], ended["compared"], ended["llama_ended"], ended["divergence"]) == (3, 3, True, None)
    ended_alone = compare_greedy([5, 7], steps, (9,), 3)
    assert ended_alone["equal"] == 2 and ended_alone["divergence"]["llama"] is None

    command = llama_greedy_command(Path("llama-completion"), Path("m.gguf"), "Hi", 32, 40, "no-fa")
    assert command[:9] == ["llama-completion", "-m", "m.gguf", "-p", "Hi", "-n", "32", "-c", "40"]
    assert {"--temp", "--top-k", "-no-cnv", "--no-display-prompt", "--verbose-prompt"} <= set(command)
    assert command[-3:] == ["--verbose-prompt", "-fa", "off"]
    assert llama_greedy_command(Path("b"), Path("m"), "Hi", 1, 2, "f32")[-6:] == ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    assert "-fa" not in llama_greedy_command(Path("b"), Path("m"), "Hi", 1, 2, "default")
