"""The CLI's shared options (one helper per option family), one-line errors and exit statuses."""

from __future__ import annotations

import argparse
import inspect

import pytest

from mmai import cli
from mmai.cli import build_parser, main


def run_cli(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _options(verb: str) -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return {opt: a for a in sub.choices[verb]._actions for opt in a.option_strings}


@pytest.mark.parametrize("verb", ["scan", "convert", "preprocess", "predict", "synth"])
@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_workers_below_one_is_a_one_line_error(verb, bad, tmp_path, capsys):
    argv = {"scan": ["scan", str(tmp_path), "--out", str(tmp_path / "i.csv")],
            "convert": ["convert", str(tmp_path), "--out", str(tmp_path / "o")],
            "preprocess": ["preprocess", "--config", "p.yaml", "--input", "m.csv", "--out", str(tmp_path / "o")],
            "predict": ["predict", "--run", "r", "--dicom-root", str(tmp_path), "--out", str(tmp_path / "p.csv")],
            "synth": ["synth", "--out", str(tmp_path / "s")]}[verb]
    assert run_cli([*argv, "--workers", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"mmai {verb}: error: argument --workers:")


def test_shared_options_come_from_one_helper_each():
    # the same option on different verbs is the same definition (type and help wording)
    for opt, verbs in {"--workers": ["scan", "convert", "preprocess", "predict", "synth"],
                       "--shard": ["preprocess", "predict"], "--device": ["preprocess", "train", "predict"],
                       "--salt-file": ["scan", "convert", "preprocess", "predict"]}.items():
        actions = [_options(v)[opt] for v in verbs]
        # same type function (None would pass for any plain-string option: compare behaviour too)
        assert len({a.type for a in actions}) == 1, opt
        assert len({(a.dest, a.nargs, a.metavar) for a in actions}) == 1, opt
        shared = {"--workers": lambda h: h[h.rindex("("):].split(", default")[0], "--shard": str, "--salt-file": str,
                  "--device": lambda h: h.split(" (default")[0]}[opt]  # the helper's own wording
        assert len({shared(a.help) for a in actions}) == 1, (opt, [a.help for a in actions])
    for opt, bad in (("--workers", "0"), ("--shard", "3/2")):  # parsed by the helper's type, alike everywhere
        verbs = ["scan", "convert", "preprocess", "predict", "synth"] if opt == "--workers" else ["preprocess",
                                                                                                  "predict"]
        errors = set()
        for v in verbs:
            with pytest.raises(argparse.ArgumentTypeError) as info:
                _options(v)[opt].type(bad)
            errors.add(str(info.value))
        assert len(errors) == 1, (opt, errors)
    assert _options("preprocess")["--device"].default == "cpu" and _options("predict")["--device"].default is None
    n_lines = len(inspect.getsource(cli.build_parser).splitlines())
    assert n_lines <= 30, f"build_parser is {n_lines} lines"


def test_shard_option_is_validated_in_one_place(capsys):
    assert run_cli(["predict", "--run", "r", "--manifest", "m", "--out", "o.csv", "--shard", "3/2"]) == 2
    assert "need N >= 1 and 0 <= I < N" in capsys.readouterr().err


def test_salt_file_too_short_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "salt").write_text("short\n")
    assert main(["scan", str(tmp_path), "--out", str(tmp_path / "i.csv"), "--salt-file", str(tmp_path / "salt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "at least 16" in err


def test_evaluate_split_choices(capsys):
    assert run_cli(["evaluate", "--predictions", "p.csv", "--manifest", "m.csv", "--split", "holdout"]) == 2
    assert "invalid choice: 'holdout'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_train_threads_below_one_is_a_one_line_error(bad, tmp_path, capsys):
    argv = ["train", "--config", "p.yaml", "--manifest", "m.csv", "--out", str(tmp_path / "r"), "--threads", bad]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
