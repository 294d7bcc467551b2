"""``plora study`` checks every flag before any work: a bad one gets argparse's message naming it and exit status 2.

Fast: no corpus is built and no run starts (the functions that would start them fail the test if called).
"""
import os

import pytest

from plora_kernels import cli, study


@pytest.fixture
def no_work(monkeypatch):
    """Any step of a real study fails the test: a refusal must come before all of them."""
    def started(*args, **kwargs):
        raise AssertionError("the study started working before refusing a flag")

    for name in ("prepare_text_assets", "initial_losses", "run_suite", "run_one", "rebuild_report"):
        monkeypatch.setattr(study, name, started)


def refused(capsys, argv, flag, *words, via_cli=False):
    with pytest.raises(SystemExit) as exit_:
        if via_cli:
            cli.main(["study", *argv])
        else:
            study.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "plora study: error: argument " + flag in err, err
    for word in words:
        assert word in err, err
    return err


BAD = [
    # (argv, flag, words the message must hold)
    (["--steps", "demo=-5"], "--steps", ("demo", ">= 1", "-5")),
    (["--steps=-5"], "--steps", ("TASK=STEPS",)),
    (["--steps", "demo=0"], "--steps", ("demo",)),
    (["--steps", "demo=ten"], "--steps", ("ten",)),
    (["--steps", "nosuch=10"], "--steps", ("unknown task", "nosuch")),
    (["--steps", "demo=10,demo=20"], "--steps", ("demo",)),
    (["--variant", "x:evrey=3"], "--variant", ("unknown variant key", "evrey")),
    (["--variant", "x:momentum=1.5"], "--variant", ("momentum", "1.5")),
    (["--variant", "x:momentum=nan"], "--variant", ("momentum",)),
    (["--variant", "x:every=2.5"], "--variant", ("every", "2.5")),
    (["--variant", "x:every=-3"], "--variant", ("every", "-3")),
    (["--variant", "x:every=often"], "--variant", ("every", "often")),
    (["--variant", "x:optimizer_reset=reset"], "--variant", ("optimizer_reset", "zero, scale, keep")),
    (["--variant", "x:a_init=random"], "--variant", ("a_init", "redraw")),
    (["--variant", "x:restart_warmup=-1"], "--variant", ("restart_warmup",)),
    (["--variant", "x:rank_mult=0"], "--variant", ("rank_mult",)),
    (["--variant", "x:steps=0"], "--variant", ("steps",)),
    (["--variant", "x:momentum"], "--variant", ("key=value",)),
    (["--variant", "x:momentum=0.1,momentum=0.2"], "--variant", ("momentum", "twice")),
    (["--variant", ":every=3"], "--variant", ("NAME",)),
    (["--variant", "LoRA:every=3"], "--variant", ("LoRA", "taken")),
    (["--variant", "a:every=3", "--variant", "a:every=4"], "--variant", ("'a'", "more than one")),
    (["--variant", "x:rank_mult=0.1"], "--variant", ("rank_mult", "int(")),
    (["--jobs", "0"], "--jobs", (">= 1", "'0'")),
    (["--jobs", "-2"], "--jobs", ("-2",)),
    (["--jobs", "two"], "--jobs", ("two",)),
    (["--seeds", "0,x"], "--seeds", ("x",)),
    (["--seeds", "0,0"], "--seeds", ("more than once",)),
    (["--seeds", "-1"], "--seeds", (">= 0",)),
    (["--seeds", ""], "--seeds", ("comma-separated",)),
    (["--tasks", "demo,nosuch"], "--tasks", ("unknown task", "nosuch", "pycode")),
    (["--tasks", "demo,"], "--tasks", ("comma-separated",)),
    (["--ranks", "4,0"], "--ranks", (">= 1",)),
    (["--suite", "length", "--tasks", "demo"], "--tasks", ("length",)),
    (["--suite", "everything"], "--suite", ("invalid choice",)),
    (["--tune", "best"], "--tune", ("invalid choice",)),
    (["--rebuild", "no-such-record.json"], "--rebuild", ("no-such-record.json", "not a file")),
]


@pytest.mark.parametrize("argv, flag, words", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_flag_is_refused_before_any_work(no_work, capsys, tmp_path, argv, flag, words):
    refused(capsys, [*argv, "--out", str(tmp_path / "out")], flag, *words)


def test_out_that_is_a_file(no_work, capsys, tmp_path):
    path = tmp_path / "results"
    path.write_text("not a folder")
    refused(capsys, ["--out", str(path)], "--out", "not a directory")
    assert path.read_text() == "not a folder"


def test_out_that_cannot_be_made(no_work, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    refused(capsys, ["--out", str(tmp_path / "file" / "results")], "--out", "cannot write")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder")
def test_out_read_only(no_work, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(capsys, ["--out", str(ro)], "--out", "cannot write")
    finally:
        ro.chmod(0o700)


def test_rebuild_of_a_file_that_is_no_record(no_work, capsys, tmp_path):
    bogus = tmp_path / "study-x.json"
    bogus.write_text("[1, 2]")
    refused(capsys, ["--rebuild", str(bogus)], "--rebuild", "not a plora study record")


def test_the_plora_command_refuses_alike(no_work, capsys, tmp_path):
    refused(capsys, ["--jobs", "0", "--out", str(tmp_path)], "--jobs", via_cli=True)
    refused(capsys, ["--variant", "x:evrey=3", "--out", str(tmp_path)], "--variant", "evrey", via_cli=True)


def test_good_flags_are_parsed_and_checked(no_work, monkeypatch, tmp_path):
    """Good flags pass, parsed into the values the study uses; the out folder is made; nothing runs (run_study
    is replaced here)."""
    seen = {}
    monkeypatch.setattr(study, "run_study", lambda args: seen.setdefault("args", study.check_args(args)))
    out = tmp_path / "new" / "results"
    assert study.main(["--steps", "demo=200, pycode=60", "--seeds", "3,1", "--ranks", "2,4", "--tasks", "demo,pycode",
                       "--jobs", "1", "--variant", "v1:every=0.25,momentum=0.5,optimizer_reset=scale,steps=300",
                       "--variant", "v2:every=never,rank_mult=2", "--out", str(out)]) == 0
    args = seen["args"]
    assert args.steps == {"demo": 200, "pycode": 60} and args.seeds == (3, 1) and args.ranks == (2, 4)
    assert args.tasks == ("demo", "pycode") and args.jobs == 1 and out.is_dir()
    v1, v2 = args.variant
    assert (v1.name, v1.method, v1.steps) == ("v1", "plora", 300)
    assert (v1.variant["every"], v1.variant["momentum"]) == (0.25, 0.5)
    assert v1.variant["optimizer_reset"] == "scale" and v1.variant["restart_warmup"] == 5  # unset: recommended
    assert (v2.method, v2.variant["rank_mult"]) == ("lora", 2.0)


def test_run_study_checks_a_namespace_built_by_hand(no_work, tmp_path):
    """Called from Python with string values (not through argparse), run_study checks them the same way."""
    args = study.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--out", str(tmp_path)])
    args.steps = "demo=-1"
    with pytest.raises(study.FlagError, match="--steps"):
        study.run_study(args)
    args.steps, args.jobs = None, 0
    with pytest.raises(study.FlagError, match="--jobs"):
        study.run_study(args)
