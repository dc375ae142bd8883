"""The per-operator latency table, measured on the CPU with tiny models: predictions are consistent with the table
and (loosely) with direct measurements, and the JSON round trip is exact. No speed is asserted."""

import json

import pytest
import torch

from megatron_flash.design import latency
from megatron_flash.design.space import WidthRule
from tests.tool_loading import load_tool

RULE = WidthRule.from_preset("tiny")
SETTING = latency.DecodeSetting(batch=1, prompt_length=2, new_tokens=8, timed_steps=6, repeats=3, warmup=1,
                                cuda_graphs=True)  # CUDA graphs requested: without a GPU the steps run eagerly


@pytest.fixture(scope="module")
def table():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield latency.measure_table(RULE, [64, 128], operators=("D", "M", "A", "F"), setting=SETTING,
                                    layers_per_measurement=2, progress=lambda line: None)
    finally:
        torch.set_num_threads(threads)


def test_table_records_its_setting(table):
    assert table.device.startswith("cpu") and table.dtype == "float32"
    assert table.widths == [64, 128] and set(table.ops) == {"D", "M", "A", "F"}
    assert table.setting["cuda_graphs"] is False and table.setting["context"] == RULE.num_meta_tokens + 2 + 4
    assert all(len(v) == 2 and all(x >= 0 for x in v) for v in table.ops.values())
    assert len(table.base) == 2 and all(x >= 0 for x in table.base)
    assert table.width_rule == RULE.to_dict()


def test_prediction_is_base_plus_the_sum_of_its_layers(table):
    for hidden in (64, 96, 128):
        parts = table.breakdown("DFMF AF", hidden)
        assert parts["D"] == pytest.approx(table.op_ms("D", hidden))
        assert parts["F"] == pytest.approx(3 * table.op_ms("F", hidden))
        assert table.predict("DFMF AF", hidden) == pytest.approx(sum(parts.values()))
        # additive in layers, independent of their order and of separators
        assert table.predict("DFMFAF", hidden) == pytest.approx(table.predict("AF|FD MF", hidden))
        assert (table.predict("DFMFAFDF", hidden) - table.predict("DFMFAF", hidden)
                == pytest.approx(table.op_ms("D", hidden) + table.op_ms("F", hidden)))
        assert table.predict("DFMFAFMF", hidden) >= table.predict("DFMFAF", hidden)
    # exact at measured widths, linear in between
    for i, w in enumerate(table.widths):
        assert table.op_ms("M", w) == table.ops["M"][i] and table.base_ms(w) == table.base[i]
    mid = table.op_ms("M", 96)
    assert mid == pytest.approx((table.ops["M"][0] + table.ops["M"][1]) / 2)
    assert table.predict_generation_ms("DFMF", 64) == pytest.approx(8 * table.predict("DFMF", 64))


def test_prediction_roughly_matches_direct_measurement(table):
    """Loose bounds only: CPU timings of sub-millisecond steps are noisy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = latency.validate(table, [("DFMFAF", 64), ("MFMFDF", 128)], progress=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert table.validation == rows
    for row in rows:
        assert row["measured_ms"] > 0
        assert 0.25 < row["predicted_ms"] / row["measured_ms"] < 4.0, row


def test_json_round_trip(table, tmp_path):
    path = tmp_path / "table.json"
    table.save(str(path))
    again = latency.LatencyTable.load(str(path))
    assert again == table
    for hidden in (64, 80, 128):
        assert again.predict("DFMFAF", hidden) == table.predict("DFMFAF", hidden)
    data = json.loads(path.read_text())
    assert data["format"] == latency.TABLE_FORMAT and data["ops"]["D"] == table.ops["D"]


def test_tables_of_different_widths_merge(table):
    parts = [latency.LatencyTable(**{**table.__dict__, "widths": [w], "base": [table.base[i]],
                                     "ops": {k: [v[i]] for k, v in table.ops.items()}, "validation": []})
             for i, w in enumerate(table.widths)]
    merged = latency.merge_tables(parts[::-1])
    assert merged.widths == table.widths and merged.ops == table.ops and merged.base == table.base
    with pytest.raises(latency.LatencyError, match="more than one table"):
        latency.merge_tables([parts[0], parts[0]])
    other = latency.LatencyTable(**{**parts[1].__dict__, "dtype": "bfloat16"})
    with pytest.raises(latency.LatencyError, match="different dtype"):
        latency.merge_tables([parts[0], other])


def test_table_errors_are_clear(table, tmp_path):
    with pytest.raises(latency.LatencyError, match="'S'.*not in the latency table"):
        table.predict("SF", 64)
    with pytest.raises(latency.LatencyError, match="no such file"):
        latency.LatencyTable.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(latency.LatencyError, match="not a latency table"):
        latency.LatencyTable.load(str(tmp_path / "bad.json"))
    one = latency.LatencyTable(**{**table.__dict__, "widths": [64], "base": [0.1],
                                  "ops": {k: [v[0]] for k, v in table.ops.items()}})
    assert one.predict("DF", 64) > 0
    with pytest.raises(latency.LatencyError, match="one width"):
        one.predict("DF", 128)
    with pytest.raises(latency.LatencyError, match="sliding window"):
        latency.measure_table(RULE, [64], operators=("S",), setting=SETTING)


def test_profile_latency_cli_table_predict_and_model(tmp_path, capsys):
    tool = load_tool("profile_latency")
    out = tmp_path / "t.json"
    small = ["--new-tokens", "8", "--timed-steps", "4", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    assert tool.main(["table", "--preset", "tiny", "--widths", "64:128:64", "--operators", "MF",
                      "--layers-per-measurement", "1", "--validate-pattern", "MFMF@64", "--output", str(out)]
                     + small) == 0
    table = latency.LatencyTable.load(str(out))
    assert table.widths == [64, 128] and set(table.ops) == {"M", "F"} and len(table.validation) == 1
    assert tool.main(["predict", "--table", str(out), "--pattern", "MF MF", "--hidden", "64", "96"]) == 0
    assert tool.main(["model", "--preset", "tiny", "--pattern", "MFMF", "--hidden", "64", "--throughput-batch", "4",
                      "--table", str(out), "--output", str(tmp_path / "m.json")] + small) == 0
    figures = json.loads((tmp_path / "m.json").read_text())
    assert figures["decode_ms_per_token"] > 0 and figures["throughput_tokens_per_s"] > 0
    assert figures["decode_ms_total"] == pytest.approx(8 * figures["decode_ms_per_token"])
    printed = capsys.readouterr().out
    assert "MFMF @ 96:" in printed and "throughput at batch 4" in printed
    assert tool.main(["predict", "--table", str(out), "--pattern", "DF", "--hidden", "64"]) == 2
    assert "'D'" in capsys.readouterr().err


def test_profile_latency_table_resumes_after_a_crash(tmp_path, capsys, monkeypatch):
    """Each width is saved as it is measured: a table killed after its first width resumes with the second only."""
    tool = load_tool("profile_latency")
    out = tmp_path / "t.json"
    partial = tmp_path / "t.json.partial"
    args = ["table", "--preset", "tiny", "--widths", "64,128", "--operators", "F", "--layers-per-measurement", "1",
            "--no-validate", "--output", str(out), "--new-tokens", "4", "--timed-steps", "2", "--repeats", "1",
            "--warmup", "0", "--threads", "1"]
    measured = []
    real_measure = latency.measure_model

    def crash_at_128(rule, pattern, hidden, *rest, **kw):
        if hidden == 128:
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        measured.append(hidden)
        return real_measure(rule, pattern, hidden, *rest, **kw)

    monkeypatch.setattr(latency, "measure_model", crash_at_128)
    with pytest.raises(KeyboardInterrupt):
        tool.main(args)
    assert not out.exists() and latency.LatencyTable.load(str(partial)).widths == [64]
    first = latency.LatencyTable.load(str(partial))

    measured.clear()
    monkeypatch.setattr(latency, "measure_model", lambda rule, pattern, hidden, *rest, **kw: (
        measured.append(hidden) or real_measure(rule, pattern, hidden, *rest, **kw)))
    assert tool.main(args) == 0
    assert "resuming" in capsys.readouterr().out
    table = latency.LatencyTable.load(str(out))
    assert table.widths == [64, 128] and table.ops["F"][0] == first.ops["F"][0] and table.base[0] == first.base[0]
    assert set(measured) == {128} and not partial.exists()  # 64 came from the partial table; warm-up at 128

    # a partial table of another setting is not mixed in: the error names the file and the difference
    first.save(str(partial))
    assert tool.main([a if a != "F" else "M" for a in args]) == 2
    err = capsys.readouterr().err
    assert str(partial) in err and "operators" in err and partial.exists()
