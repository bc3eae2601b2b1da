"""The converter and the HDF5 model file it writes."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, STORIES, need_stories

from dllama_mpi.files.convert import main as convert_main
from dllama_mpi.files.modelfile import ModelFile, ModelFileError
from dllama_mpi.model import quant


def test_file_is_self_describing(stories_models):
    with h5py.File(stories_models["q40"], "r") as f:
        attrs = dict(f.attrs)
        assert attrs["format"] == "dllama_mpi" and attrs["format_version"] == 1
        assert (attrs["dim"], attrs["hidden_dim"], attrs["n_layers"], attrs["n_heads"], attrs["n_kv_heads"]) == (64, 172, 5, 8, 4)
        assert attrs["weight_type"] == "q40" and attrs["rope_style"] == "interleaved" and attrs["shared_classifier"]
        assert f["layers/0/wq"].dtype == quant.Q40 and f["layers/0/wq"].attrs["type"] == "q40"
        assert f["layers/0/w2"].dtype == np.float32  # 172-wide rows are not whole Q40 blocks
        assert f["tokenizer"].attrs["vocab_size"] == 512
    model = ModelFile(stories_models["q40"])
    assert model.tokenizer().encode("Once upon a time")[0] == 1
    model.close()


def test_q40_weights_are_the_f32_weights_quantized(stories_models):
    f32, q40 = ModelFile(stories_models["f32"]), ModelFile(stories_models["q40"])
    dense, blocks = f32.read("layers/3/w1"), q40.read("layers/3/w1")
    np.testing.assert_array_equal(quant.as_bytes(blocks), quant.as_bytes(quant.quantize_q40(dense)))
    err = np.abs(quant.dequantize_q40(blocks) - dense).max()
    assert 0 < err < np.abs(dense).max() / 8


def test_refuses_to_overwrite_without_force(stories_models, capsys):
    need_stories()
    args = [str(STORIES / "stories260K.bin"), str(stories_models["f32"]), "--tokenizer", str(STORIES / "tok512.bin")]
    assert convert_main(args) == 2
    assert "pass --force" in capsys.readouterr().err


def test_unknown_input_format_is_named(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    assert convert_main([str(junk), str(tmp_path / "out.h5")]) == 2
    assert "can't tell the format" in capsys.readouterr().err
    assert not (tmp_path / "out.h5").exists()


def test_missing_tokenizer_is_explained(tmp_path, capsys):
    need_stories()
    assert convert_main([str(STORIES / "stories260K.bin"), str(tmp_path / "out.h5")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert convert_main([str(STORIES / "stories260K.bin"), str(tmp_path / "out.h5"), "--tokenizer", str(tmp_path)]) == 2
    assert f"llama2.c tokenizer {tmp_path} is not a file; pass --tokenizer PATH" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary left behind


def test_tools_script_and_console_command(tmp_path):
    need_stories()
    out = tmp_path / "s.h5"
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), str(STORIES / "stories260K.bin"), str(out),
           "--tokenizer", str(STORIES / "tok512.bin"), "--weights", "q40"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "w2 kept as f32" in result.stderr
    assert ModelFile(out).spec.weight_type == "q40"


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__setitem__("format_version", 99), "format version 1 to 3, found"),
    (lambda f: f.__delitem__("layers/2/wk"), "tensor 'layers/2/wk' is missing"),
    (lambda f: f.attrs.__setitem__("n_heads", 5), "n_heads (5) must be a multiple of n_kv_heads"),
    (lambda f: f.attrs.__setitem__("dim", 96), "should be"),
])
def test_damaged_files_are_refused_with_a_reason(stories_models, tmp_path, damage, message):
    path = tmp_path / "damaged.h5"
    path.write_bytes(stories_models["f32"].read_bytes())
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(ModelFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelFile(path)


def _random_llama2c(path, dim=512, hidden=1536, layers=12, vocab=512, seq_len=256, seed=0):
    """A llama2.c checkpoint with random weights (shared classifier)."""
    import struct

    head_dim, n_heads = 64, dim // 64
    count = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * dim * hidden) + dim + seq_len * head_dim
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, n_heads, n_heads, vocab, seq_len))
        np.random.default_rng(seed).standard_normal(count, dtype=np.float32).tofile(f)
    return path


def test_killed_conversion_leaves_no_output(tmp_path):
    import os
    import signal
    import time

    need_stories()
    src = _random_llama2c(tmp_path / "big.bin")
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "dllama_mpi", "convert", str(src), str(out), "--tokenizer", str(STORIES / "tok512.bin")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in tmp_path.glob(".out.h5.tmp-*")) < 2**20 and time.monotonic() < deadline:
        time.sleep(0.005)  # until the writer has written some tensors (its record, flushed first, is in)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    # the next conversion of the same target clears the dead writer's temporary
    assert convert_main([str(STORIES / "stories260K.bin"), str(out), "--tokenizer", str(STORIES / "tok512.bin")]) == 0
    assert out.exists() and not list(tmp_path.glob(".out.h5.tmp*"))


def test_flipped_byte_in_a_weight_is_caught(stories_models, tmp_path):
    path = tmp_path / "flipped.h5"
    path.write_bytes(stories_models["q40"].read_bytes())
    with h5py.File(path, "r") as f:
        offset = f["layers/1/w1"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0x10
    path.write_bytes(bytes(data))
    model = ModelFile(path)  # attributes and shapes are intact
    with pytest.raises(ModelFileError, match=r"flipped.h5 is damaged \(tensor 'layers/1/w1' can't be read"):
        model.read("layers/1/w1")


DEAD_PID = 2**22 + 1  # above Linux's pid_max: no such process


def _temporary(target, writer, directory=False, marker=True):
    """A leftover temporary of `target` as `writer` (atomic_output.Writer) would leave it: named
    after its host and pid, its record inside (a model file's half, or a shard directory)."""
    from dllama_mpi.files.atomic_output import MARKER, temporary_name

    path = target.with_name(temporary_name(target, writer, "0badc0de"))
    if directory:
        path.mkdir()
        if marker:
            (path / MARKER).write_text(str(writer))
        (path / "shard-0-of-2.h5").write_bytes(b"half written")
    else:
        with h5py.File(path, "w") as f:
            if marker:
                f.attrs[MARKER] = str(writer)
            f.create_dataset("half", data=np.zeros(10))
    return path


def _convert_stories(out, *more):
    return convert_main([str(STORIES / "stories260K.bin"), str(out), "--tokenizer", str(STORIES / "tok512.bin"), *more])


def test_a_dead_writers_temporary_is_removed(tmp_path):
    from dllama_mpi.files.atomic_output import this_writer

    need_stories()
    dead = this_writer()._replace(pid=DEAD_PID)
    leftovers = [_temporary(tmp_path / "out.h5", dead), _temporary(tmp_path / "shards", dead, directory=True)]
    assert _convert_stories(tmp_path / "out.h5") == 0
    assert _convert_stories(tmp_path / "shards", "--memory-budget", "1", "1") == 0
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "shards"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-0-of-2.h5", "shard-1-of-2.h5"]
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert "dllama_mpi_temporary" not in f.attrs  # a finished file carries no record


def test_a_users_files_named_like_temporaries_are_never_removed(tmp_path, stories_models):
    """Old-style names (.out.h5.tmp<pid>), new-style names without our record (a copy of a
    model file among them), a record that disagrees with the name, a directory with more
    than shards in it: none is the converter's to remove."""
    import socket

    from dllama_mpi.files.atomic_output import this_writer

    need_stories()
    out, host = tmp_path / "out.h5", socket.gethostname()
    (tmp_path / f".out.h5.tmp{DEAD_PID}").write_text("precious")
    (tmp_path / ".out.h5.tmp4").write_bytes(stories_models["q40"].read_bytes())
    (tmp_path / f".out.h5.tmp-{host}-{DEAD_PID}").write_text("precious")
    (tmp_path / f".out.h5.tmp-{host}-{DEAD_PID}-0badc0de").write_text("precious")
    (tmp_path / f".out.h5.tmp-{host}-{DEAD_PID + 1}-0badc0de").write_bytes(stories_models["q40"].read_bytes())
    _temporary(out, this_writer()._replace(pid=DEAD_PID + 2), directory=True, marker=False)
    disagreeing = _temporary(out, this_writer()._replace(pid=DEAD_PID + 3))
    disagreeing.rename(tmp_path / f".out.h5.tmp-{host}-{DEAD_PID + 4}-0badc0de")  # its record names another pid
    crowded = _temporary(tmp_path / "shards", this_writer()._replace(pid=DEAD_PID), directory=True)
    (crowded / "thesis.tex").write_text("precious")
    before = {p.name: None if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert _convert_stories(out) == 0
    assert _convert_stories(tmp_path / "shards", "--memory-budget", "1", "1") == 0
    after = {p.name: None if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert after == {**before, "out.h5": after["out.h5"], "shards": None}
    assert (crowded / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("other", ["host", "pid-namespace", "boot"])
def test_another_hosts_temporary_is_left(tmp_path, other):
    """A node sharing the filesystem (or a container) runs writers whose pids mean nothing
    here: their temporaries are left, live or not."""
    from dllama_mpi.files.atomic_output import this_writer

    need_stories()
    field = {"host": "host", "pid-namespace": "pid_ns", "boot": "boot"}[other]
    theirs = this_writer()._replace(pid=DEAD_PID, **{field: "other-node"})
    leftovers = [_temporary(tmp_path / "out.h5", theirs), _temporary(tmp_path / "shards", theirs, directory=True)]
    assert _convert_stories(tmp_path / "out.h5") == 0
    assert _convert_stories(tmp_path / "shards", "--memory-budget", "1", "1") == 0
    assert all(p.exists() for p in leftovers)


def test_a_temporary_whose_pid_now_runs_another_process_is_stale(tmp_path):
    """The pid is alive, but the process started at another time than the writer did: the
    pid was reused and the writer is gone. The writer itself, alive, keeps its temporary."""
    from dllama_mpi.files.atomic_output import this_writer

    need_stories()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stat = open(f"/proc/{alive.pid}/stat").read()
        start = int(stat.rsplit(")", 1)[1].split()[19])
        live = _temporary(tmp_path / "a.h5", this_writer()._replace(pid=alive.pid, start=start))
        reused = _temporary(tmp_path / "b.h5", this_writer()._replace(pid=alive.pid, start=start - 1))
        assert _convert_stories(tmp_path / "a.h5") == 0 and _convert_stories(tmp_path / "b.h5") == 0
        assert live.exists() and not reused.exists()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("second", ["same-namespace", "another-pid-namespace"])
def test_two_conversions_of_one_target_at_once(tmp_path, second):
    """Both finish (or one refuses with one line), neither removes the other's temporary, and
    what is left is one valid model file. In another pid namespace the first writer's pid
    is not visible to the second (as on another node sharing the filesystem). The first is
    stopped (SIGSTOP) from when its temporary stands until the second has ended, so the two
    overlap whatever the machine's speed, and a model of 2 layers is enough."""
    import signal
    import time

    need_stories()
    src = _random_llama2c(tmp_path / "big.bin", layers=2)
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "dllama_mpi", "convert", str(src), str(out), "--tokenizer", str(STORIES / "tok512.bin")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.h5.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.005)  # until the first writer's temporary stands
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first conversion finished before the second started"
        prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if second == "another-pid-namespace" else []
        try:
            other = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            pytest.skip("unshare (util-linux) is not installed")
        if other.returncode and "unshare:" in other.stderr:
            pytest.skip(f"can't make a pid namespace here: {other.stderr.strip()}")
    except BaseException:  # a skip or a failure: the stopped writer is not left behind
        first.kill()
        first.communicate()
        raise
    first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=300)[1]
    for code, err in ((first.returncode, first_err), (other.returncode, other.stderr)):
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and err.count("error:") == 1), err
    assert 0 in (first.returncode, other.returncode)
    assert ModelFile(out).spec.n_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "out.h5"]


def test_progress_shows_as_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """A log (CI, Slurm) gets plain lines, at most one per PROGRESS_INTERVAL_S and one at the end."""
    from dllama_mpi.files import modelfile

    need_stories()
    monkeypatch.setattr(modelfile, "PROGRESS_INTERVAL_S", 0)
    assert _convert_stories(tmp_path / "a.h5") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("converting: ")]
    tensors = []
    with h5py.File(tmp_path / "a.h5", "r") as f:
        f.visititems(lambda name, item: tensors.append(name) if isinstance(item, h5py.Dataset) else None)
    tensors = [name for name in tensors if not name.startswith("tokenizer/")]
    assert len(lines) == len(tensors) + 1  # one per tensor, and the end
    assert all(line.rsplit(", ", 1)[1] in tensors for line in lines)  # each names the tensor just written
    done = [float(line.split()[1]) for line in lines]
    assert done == sorted(done) and "(100 %)" in lines[-1] and "(100 %)" not in lines[0]
    monkeypatch.setattr(modelfile, "PROGRESS_INTERVAL_S", 1e9)
    assert _convert_stories(tmp_path / "b.h5") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("converting: ")]
    assert len(lines) == 1 and "(100 %)" in lines[0]


def test_an_empty_directory_takes_shards_without_force(tmp_path):
    need_stories()
    out = tmp_path / "shards"
    out.mkdir()
    assert convert_main([str(STORIES / "stories260K.bin"), str(out), "--tokenizer", str(STORIES / "tok512.bin"),
                         "--memory-budget", "1", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-2.h5", "shard-1-of-2.h5"]


def test_replacing_shards_never_loses_both_sets(tmp_path, monkeypatch):
    """The old shards are moved aside before the new ones take their place; when the old set
    can't be removed, it stays whole beside the new one and the message says where."""
    from pathlib import Path

    from dllama_mpi.files.convert import convert

    need_stories()
    args = (STORIES / "stories260K.bin", tmp_path / "shards", STORIES / "tok512.bin", "q40")
    convert(*args, budgets=["3", "1"])
    unlink = Path.unlink

    def refusing_unlink(self, *a, **k):
        if self.name == "shard-1-of-2.h5" and ".replaced" in self.parent.name:
            raise PermissionError(1, "Operation not permitted")
        return unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", refusing_unlink)
    with pytest.raises(ModelFileError, match="the shards it replaced were moved to .* but can't be removed"):
        convert(*args, force=True, budgets=["1", "1"])
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-0-of-2.h5", "shard-1-of-2.h5"]
    assert h5py.File(tmp_path / "shards" / "shard-0-of-2.h5", "r").attrs["plan_budgets"].tolist() == [1, 1]
    (moved,) = [p for p in tmp_path.iterdir() if ".replaced" in p.name]
    assert sorted(p.name for p in moved.iterdir()) == ["shard-1-of-2.h5"]  # shard 0 removed, shard 1 kept


def test_an_unwritable_place_is_the_users_error(tmp_path, monkeypatch):
    from pathlib import Path

    from dllama_mpi.files.convert import convert

    need_stories()

    def refusing_mkdir(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    with pytest.raises(ModelFileError, match=f"can't write in {tmp_path}: Permission denied"):
        convert(STORIES / "stories260K.bin", tmp_path / "shards", STORIES / "tok512.bin", "q40", budgets=["1", "1"])
    assert list(tmp_path.iterdir()) == []
