"""tools/kernel_speed.py: each weight type's product timed on a model's shapes beside a read probe."""

import json

import pytest

pytestmark = pytest.mark.tools  # every test here runs a tool of tools/


def test_every_product_of_each_type_is_timed_beside_the_probe(tmp_path, capsys):
    import kernel_speed

    out = tmp_path / "k.json"
    assert kernel_speed.main(["--shape", "tiny", "--types", "q40", "q6k", "--threads", "1", "--seconds", "0.01",
                              "--stream-mib", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["facts"]["read_gb_s"] > 0 and report["facts"]["threads"] == 1
    assert [(r["type"], r["product"]) for r in report["rows"]] == [
        (t, p) for t in ("q40", "q6k") for p in ("wq+wk+wv", "wo", "w1+w3", "w2", "classifier")]
    tiny_rows = {"wq+wk+wv": 256 + 2 * 4 * 32, "wo": 256, "w1+w3": 2 * 768, "w2": 256, "classifier": 1024}
    for row in report["rows"]:
        assert row["rows"] == tiny_rows[row["product"]] and row["gb_s"] > 0 and row["of_probe"] > 0
    assert "read bandwidth" in capsys.readouterr().out


def test_attention_of_each_kv_type_is_timed_at_each_depth(tmp_path):
    import kernel_speed

    out = tmp_path / "k.json"
    assert kernel_speed.main(["--shape", "tiny", "--types", "q40", "--kv-types", "f16", "q8_0", "--depths", "70", "300",
                              "--threads", "1", "--seconds", "0.01", "--stream-mib", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["attention"]
    assert [(r["kv_type"], r["depth"]) for r in rows] == [("f16", 70), ("f16", 300), ("q8_0", 70), ("q8_0", 300)]
    tiny_kv_row = {"f16": 2 * 32, "q8_0": 32 + 2}  # one head's key at one position: tiny has 4 KV heads of 32
    for r in rows:
        assert r["bytes"] == 2 * (r["depth"] + 1) * 4 * tiny_kv_row[r["kv_type"]] and r["gb_s"] > 0 and r["of_probe"] > 0


def test_a_type_the_shapes_would_widen_is_named_not_timed(tmp_path, capsys, stories_models):
    import kernel_speed

    out = tmp_path / "k.json"  # stories260K: 64 wide, rows that are not whole 256-value super-blocks
    assert kernel_speed.main(["--model", str(stories_models["q40"]), "--types", "q4k", "--threads", "1",
                              "--seconds", "0.01", "--stream-mib", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == []
    assert capsys.readouterr().out.count("are not whole q4k blocks: held as") == 5
