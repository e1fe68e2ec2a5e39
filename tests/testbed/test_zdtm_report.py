"""tests/zdtm/report.py: the zdtm gate (the agent's daemon fails no test CRIU's daemon passes)."""
import importlib.util
import json
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "tests" / "zdtm" / "report.py"
spec = importlib.util.spec_from_file_location("zdtm_report", REPORT)
report = importlib.util.module_from_spec(spec)
sys.modules["zdtm_report"] = report  # dataclasses look their module up
spec.loader.exec_module(report)

TAP_HEAD = "TAP version 13\n# Hardware architecture: x86_64\n1..3\n"


def make_run(out: Path, name: str, tap: str | None, served: int = 0) -> None:
    d = out / name
    (d / "report").mkdir(parents=True)
    (d / "params").write_text("daemon=x\n")
    if tap is not None:
        (d / "report" / "criu-testreport.tap").write_text(TAP_HEAD + tap)
        (d / "exit").write_text("0\n")
    if served:
        (d / "served-by-snaptier").write_text("dir\n" * served)


def test_parse_tap_reads_pass_fail_and_skip_with_its_reason():
    got = report.parse_tap(TAP_HEAD + "ok 1 - zdtm/static/a\nnot ok 2 - zdtm/static/b # flavor h\n"
                           "\"output\": |\n  ok 9 - not a result line\n"
                           "ok 3 - zdtm/static/c # SKIP no uffd feature\n")
    assert got == {"zdtm/static/a": "pass", "zdtm/static/b": "fail", "zdtm/static/c": "skip: no uffd feature"}


def test_a_test_criu_passes_and_the_agent_fails_is_a_regression(tmp_path, capsys):
    make_run(tmp_path, "h-criu", "ok 1 - zdtm/static/a\nok 2 - zdtm/static/b\n")
    make_run(tmp_path, "h-snaptier-none", "ok 1 - zdtm/static/a\nnot ok 2 - zdtm/static/b # flavor h\n", served=2)
    assert report.main(["report.py", str(tmp_path)]) == 1
    assert "zdtm/static/b (h flavor): passes with CRIU's daemon, fails with snaptier-none" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["regressions"] == [{"flavor": "h", "daemon": "snaptier-none", "test": "zdtm/static/b"}]


def test_a_failure_shared_with_criu_is_listed_not_counted(tmp_path, capsys):
    make_run(tmp_path, "ns-criu", "ok 1 - zdtm/static/a\nnot ok 2 - zdtm/static/b # flavor ns\n")
    make_run(tmp_path, "ns-snaptier-all", "ok 1 - zdtm/static/a\nnot ok 2 - zdtm/static/b # flavor ns\n", served=2)
    assert report.main(["report.py", str(tmp_path)]) == 0
    assert "Fail with CRIU's daemon too (not counted): zdtm/static/b (ns)" in capsys.readouterr().out


def test_a_test_the_agent_did_not_run_is_a_regression(tmp_path):
    make_run(tmp_path, "h-criu", "ok 1 - zdtm/static/a\nok 2 - zdtm/static/b\n")
    make_run(tmp_path, "h-snaptier-none", "ok 1 - zdtm/static/a\n", served=1)
    assert report.main(["report.py", str(tmp_path)]) == 1


def test_a_run_without_a_report_fails_the_gate(tmp_path, capsys):
    make_run(tmp_path, "h-criu", "ok 1 - zdtm/static/a\n")
    make_run(tmp_path, "h-snaptier-none", None)
    assert report.main(["report.py", str(tmp_path)]) == 1
    assert "h-snaptier-none: the run did not finish" in capsys.readouterr().out


def test_passes_without_the_agent_daemon_ever_starting_fail_the_gate(tmp_path, capsys):
    make_run(tmp_path, "h-criu", "ok 1 - zdtm/static/a\n")
    make_run(tmp_path, "h-snaptier-none", "ok 1 - zdtm/static/a\n", served=0)
    assert report.main(["report.py", str(tmp_path)]) == 1
    assert "never started" in capsys.readouterr().out


def test_a_failure_at_dump_is_not_the_daemons(tmp_path, capsys):
    make_run(tmp_path, "ns-criu", "ok 1 - zdtm/transition/thread-bomb\n")
    make_run(tmp_path, "ns-snaptier-none", "not ok 1 - zdtm/transition/thread-bomb # flavor ns\n", served=0)
    (tmp_path / "ns-snaptier-none" / "zdtm.log").write_text(
        "##### Test zdtm/transition/thread-bomb FAIL at CRIU dump #####\n")
    assert report.main(["report.py", str(tmp_path)]) == 0
    assert "Failed before any lazy-pages daemon ran (not counted): zdtm/transition/thread-bomb (ns, snaptier-none)" \
        in capsys.readouterr().out


def test_a_failure_at_restore_is_counted(tmp_path):
    make_run(tmp_path, "h-criu", "ok 1 - zdtm/static/a\n")
    make_run(tmp_path, "h-snaptier-all", "not ok 1 - zdtm/static/a # flavor h\n", served=1)
    (tmp_path / "h-snaptier-all" / "zdtm.log").write_text("## Test zdtm/static/a FAIL at CRIU restore ##\n")
    assert report.main(["report.py", str(tmp_path)]) == 1
