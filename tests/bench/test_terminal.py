"""What the terminal shows: plain user text (no Rich markup or emoji codes) and errors that name their cause."""

from __future__ import annotations

from tests.bench.test_cli_errors import GOOD, run_cli


def test_error_text_is_printed_as_is(tmp_path, monkeypatch, capsys):
    """A suite error at line 100 reads `x.yaml:100:`; Rich would turn `:100:` into an emoji, `[..]` into markup."""
    path = tmp_path / "x.yaml"
    path.write_text("#\n" * 94 + GOOD.replace("lr: 1e-3", "lrr: 1e-3"))
    code, _, err = run_cli(["run", "--suite", str(path)], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "x.yaml:100:" in err and "\U0001f4af" not in err, err


def test_set_errors_name_the_flag_not_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "good.yaml").write_text(GOOD)
    code, _, err = run_cli(["run", "--suite", str(tmp_path / "good.yaml"), "--set", "task.steps=-3"], tmp_path,
                           monkeypatch, capsys)
    text = " ".join(err.split())
    assert code == 2 and "--set task.steps=-3: experiments.0.overrides.steps" in text, err
    assert "good.yaml:" not in text and "good.yaml is valid without --set task.steps=-3" in text
    code, _, err = run_cli(["run", "--suite", str(tmp_path / "good.yaml"), "--set", "hparams.lr=-1"], tmp_path,
                           monkeypatch, capsys)
    assert code == 2 and "--set hparams.lr=-1: experiments.0.optimizers.0: optimizer 'adamw' rejects" in err, err


def test_file_errors_still_name_the_file_line(tmp_path, monkeypatch, capsys):
    """With --set given, a problem of the file itself is still reported at its line."""
    (tmp_path / "bad.yaml").write_text(GOOD.replace("lr: 1e-3", "lrr: 1e-3"))
    code, _, err = run_cli(["run", "--suite", str(tmp_path / "bad.yaml"), "--set", "task.steps=5"], tmp_path,
                           monkeypatch, capsys)
    assert code == 2 and "bad.yaml:6: experiments.0.optimizers.0" in err, err
