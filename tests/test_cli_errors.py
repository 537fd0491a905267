"""The `trail` command says what is wrong: a bad value of any option of any subcommand is one line
on stderr (`trail sim: error: argument --load: must be a number > 0, got '0' ...`) and exit code 2,
never a traceback; `--help` imports no torch; `--seeds` is a count and `--seed-list` names seeds;
a run too small to say anything prints a note instead of silent n/a. The issue's cases run in fresh
interpreters (`python -m trail.cli`), as a user runs them; the rest through `trail.cli.main` in this
process (the same parser and error path, without paying a torch import per case)."""
import os
import subprocess
import sys

import pytest

from trail.cli import build_parser
from trail.cli_args import seeds_of


def trail(*argv, cwd=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "trail.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "trace.jsonl").write_text("")
    (d / "preds.npz").write_bytes(b"")
    return d


# (argv, what stderr must say: a string or several); TRACE / NPZ / DIR stand for an existing file /
# file / folder. Where the message comes from another module (the engine's checks, the probe files,
# the demo), only the argument's name and the gist are pinned.
BAD = [
    # trail sim: the issue's list, then the rest of its options
    (["sim", "--load", "0"], "argument --load: must be a number > 0, got '0'"),
    (["sim", "--seeds", "0,,1"], "argument --seeds: must be a count N (runs seeds 0..N-1), got '0,,1'"),
    (["sim", "--seeds", "0,3,7"], "use --seed-list 0,3,7"),
    (["sim", "--seed-list", "0,,1"], "argument --seed-list: must be integers >= 0, comma separated with no empty"),
    (["sim", "--seeds", "2", "--seed-list", "1"], "argument --seed-list: not allowed with argument --seeds"),
    (["sim", "--policies", "fcfs,trial"], "argument --policies: unknown policy 'trial'; did you mean 'trail'?"),
    (["sim", "--policies", "fcfs,fcfs"], "'fcfs' is listed twice"),
    (["sim", "--predictions", "bogus"], "argument --predictions: must be recorded, prefill, exact or noisy:<sd>"),
    (["sim", "--predictions", "noisy:-1"], "argument --predictions:"),
    (["sim", "--opt", "foo=1"], "argument --opt: unknown option 'foo'"),
    (["sim", "--opt", "c"], "argument --opt: must be NAME=VALUE"),
    (["sim", "--n", "0"], "argument --n: must be a positive integer, got '0'"),
    (["sim", "--rate", "inf"], "argument --rate: must be a number > 0, got 'inf'"),
    (["sim", "--load", "1", "--rate", "2"], "argument --rate: not allowed with argument --load"),
    (["sim", "--host-blocks", "-1"], "argument --host-blocks: must be an integer >= 0, got '-1'"),
    (["sim", "--regime", "big"], "argument --regime: invalid choice: 'big'"),
    (["sim", "--input", "missing.json"], "argument --input: no such file: 'missing.json'"),
    (["sim", "--json", "no/such/dir/out.json"], "argument --json: cannot write 'no/such/dir/out.json'"),
    # found after parsing (the engine's own checks), still one line and exit code 2
    (["sim", "--opt", "c=-1"], ("trail sim: error: argument --opt: ", "c must be a finite number >= 0")),
    # the other subcommands
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--num-requests", "0"], ("argument --num-requests: must be", "got '0'")),
    (["collect", "--out", "t.jsonl", "--top-p", "2"], "argument --top-p: must be a number in (0, 1], got '2'"),
    (["collect", "--out", "t.jsonl", "--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["collect", "--top-p", "1"], "the following arguments are required: --out"),
    (["embed", "missing.jsonl", "--out", "f.safetensors"], "argument trace: no such file: 'missing.jsonl'"),
    (["embed", "TRACE", "--out", "f.safetensors", "--layers", "1,x"], "argument --layers: must be an integer >= 0"),
    (["train-probe", "TRACE", "--out", "p", "--num-bins", "1"], "argument --num-bins: must be an integer >= 2"),
    (["train-probe", "TRACE", "--out", "p", "--layer", "3", "--sweep-layers"], "not allowed with argument --layer"),
    (["eval-probe", "TRACE", "--probe", "DIR", "--out", "e"], ("argument --probe: ", "probe.json")),
    (["judge", "NPZ", "--loads", "1,0"], "argument --loads: must be a number > 0, got '0'"),
    (["judge", "NPZ", "--seeds", "0,1"], "use --seed-list 0,1"),
    (["judge", "NPZ", "-n", "-5"], "argument -n: must be a positive integer, got '-5'"),
]


# what the issue found, each run as the user ran it
ISSUE = {("sim", "--load", "0"), ("sim", "--seeds", "0,,1"), ("sim", "--policies", "fcfs,trial"),
         ("sim", "--predictions", "bogus"), ("sim", "--opt", "foo=1"), ("nosuch",)}


def run_in_process(argv, capsys):
    from trail.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_value_is_one_line_and_exit_code_2(argv, says, files, capsys, monkeypatch):
    where = {"TRACE": files / "trace.jsonl", "NPZ": files / "preds.npz", "DIR": files}
    argv = [str(where.get(a, a)) for a in argv]
    if tuple(argv) in ISSUE:
        r = trail(*argv, cwd=files)
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        monkeypatch.chdir(files)
        rc, out, err = run_in_process(argv, capsys)
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err and "\n" not in err.strip(), err[-2000:]
    assert err.startswith("trail") and ": error: " in err, err
    assert all(part in err for part in ([says] if isinstance(says, str) else says)), err
    assert out == ""


def test_help_imports_no_torch():
    """Building the parser and formatting every command's help loads neither torch nor trail._C
    nor the predictor package; `trail sim --help` as run imports no torch either."""
    code = ("import sys, argparse\n"
            "from trail.cli import build_parser\n"
            "p = build_parser()\n"
            "sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))\n"
            "texts = [p.format_help()] + [q.format_help() for q in sub.choices.values()]\n"
            "print(len(sub.choices), sum('default' in t for t in texts))\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')\n"
            "                      or m in ('trail._C', 'trail._native', 'trail.predictor'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    counts, heavy = (r.stdout.splitlines() + [""])[:2]
    assert counts.split()[0] == "10", counts    # info demo sim collect embed train-probe eval-probe judge serve bench-serve
    assert heavy == "", f"building the parser imported {heavy}"
    for argv in (["--help"], ["sim", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "trail.cli", *argv], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "usage: trail" in r.stdout, r.stderr[-2000:]
        assert "torch" not in r.stderr, [ln for ln in r.stderr.splitlines() if "torch" in ln][:5]


def test_every_option_has_help_and_states_its_default():
    """Every option of every command has help; each that has a default shows it in --help (or says
    what it defaults to); options that default to nothing (None, a flag's off) need not."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    no_help, no_default = [], []
    for name, p in sub.choices.items():
        if name == "demo":          # the demo's options are rewritten with the demo (cli.py's cmd_demo)
            continue
        assert p.description, f"trail {name} has no description"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {(action.option_strings or [action.dest])[-1]}"
            if not action.help:
                no_help.append(label)
            elif action.option_strings and not (action.default is None or action.default is False
                                                 or action.default == []):
                if "default" not in p.formatter_class(prog="x")._get_help_string(action).lower():
                    no_default.append(label)
    assert not no_help and not no_default, (no_help, no_default)


def test_seeds_is_a_count_and_seed_list_names_seeds():
    parse = build_parser().parse_args
    assert seeds_of(parse(["sim"])) == [0, 1, 2]
    assert seeds_of(parse(["sim", "--seeds", "3"])) == [0, 1, 2]
    assert seeds_of(parse(["sim", "--seeds", "1"])) == [0]
    assert seeds_of(parse(["sim", "--seed-list", "3"])) == [3]
    assert seeds_of(parse(["sim", "--seed-list", "0,3,7"])) == [0, 3, 7]
    assert seeds_of(parse(["judge", __file__, "--seed-list", "5"])) == [5]      # any existing file


def test_a_run_too_small_to_say_anything_says_so(capsys):
    """150 requests at saturation: no queue builds and the oracle gains < 10% over fcfs;
    the table is followed by notes saying so (and that one seed has no spread)."""
    rc, out, err = run_in_process(["sim", "--n", "150", "--seeds", "1", "--policies", "fcfs,trail,oracle"], capsys)
    assert rc == 0, err[-3000:]
    notes = [ln for ln in out.splitlines() if ln.startswith("note: ")]
    assert any("'oracle frac' is n/a: the oracle cuts fcfs's mean latency by only" in ln and "runs of 150 requests"
               in ln for ln in notes), out
    assert any(ln.startswith("note: one seed:") for ln in notes), out
    assert any("/sjf is nan: add sjf_prompt" in ln for ln in notes), out
    assert "x 1 seed (0)" in out
