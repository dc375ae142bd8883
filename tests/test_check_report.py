"""megatron_flash.testing.CheckReport, through which the GPU check scripts report: each save leaves the results so
far in $OUT (a call cut short keeps them), and the verdict decides the exit code and the last line."""

import json

from megatron_flash.testing import CheckReport


def test_saves_partial_results_and_the_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    report = CheckReport("x_gpu.json")
    report["rows"] = [{"ok": True}]
    report.save()
    assert json.loads((tmp_path / "x_gpu.json").read_text()) == {"rows": [{"ok": True}]}
    report["rows"].append({"ok": False})
    assert report.finish(False, "widget checks") == 1
    saved = json.loads((tmp_path / "x_gpu.json").read_text())
    assert saved["ok"] is False and len(saved["rows"]) == 2 and saved["seconds"] >= 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'x_gpu.json'}" in out and out.rstrip().endswith("SOME WIDGET CHECKS FAILED")
    assert CheckReport("y_gpu.json").finish(True, "widget checks") == 0
    assert capsys.readouterr().out.rstrip().endswith("all widget checks passed")


def test_without_out_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    report = CheckReport("x_gpu.json")
    report.save()
    assert report.path is None and report.finish(True, "widget checks") == 0
    assert list(tmp_path.iterdir()) == [] and "wrote" not in capsys.readouterr().out


def test_rows_are_saved_as_they_are_appended(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    report = CheckReport("x_gpu.json")
    rows = report.rows("accuracy")
    rows.append({"backend": "fla", "y": 3e-3})
    assert json.loads((tmp_path / "x_gpu.json").read_text()) == {"accuracy": [{"backend": "fla", "y": 3e-3}]}
    rows.append({"backend": "torch"})
    assert len(json.loads((tmp_path / "x_gpu.json").read_text())["accuracy"]) == 2
