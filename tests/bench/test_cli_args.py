"""``gpuquant bench`` arguments refused before anything is measured, and the recorded
command line."""
import shlex

import pytest

from gpuquant import cli


def test_bad_out_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (str(f), str(f / "sub"), ""):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "quant", "--quick", "--out", out])
        assert e.value.code == 2
    assert "argument --out" in capsys.readouterr().err


def test_where_matching_nothing_and_unknown_skips_are_refused(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "quant.json").write_text("{}")
    assert cli.main(["bench", "quant", "--quick", "--out", str(out),
                     "--where", "op=quantise"]) == 2
    assert "no case of suite 'quant' matches" in capsys.readouterr().err
    assert (out / "quant.json").read_text() == "{}"  # untouched
    assert cli.main(["bench", "quant", "--quick", "--out", str(out),
                     "--skip", "gpuquant-nmpy"]) == 2
    assert "no suite run here has a provider 'gpuquant-nmpy'" in capsys.readouterr().err


def test_recorded_command_is_shell_quoted(monkeypatch, tmp_path):
    seen = {}
    import gpuquant.bench as bench
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: seen.update(k) or 0)
    argv = ["bench", "quant", "--out", str(tmp_path), "--where", "qdtype=quint8|qint8"]
    assert cli.main(argv) == 0
    assert shlex.split(seen["command"]) == ["gpuquant"] + argv
