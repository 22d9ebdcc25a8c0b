"""The exit-code hand-over between training processes and `vlmtune launch`: one module writes and reads it."""

from vlmtune.exit_report import EXIT_DIR_ENV, report_exit_code, workers_exit_code


def test_the_workers_exit_code_wins_over_torchruns_1(tmp_path):
    assert workers_exit_code(tmp_path, 1) == 1  # nothing reported: the launcher's own failure
    (tmp_path / "rank-1").write_text("75")
    (tmp_path / "rank-0").write_text("0")
    assert workers_exit_code(tmp_path, 1) == 75
    (tmp_path / "rank-10").write_text("2")
    assert workers_exit_code(tmp_path, 1) == 75  # by rank, not by name


def test_what_a_worker_reports_is_what_the_launcher_reads(tmp_path, monkeypatch):
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    report_exit_code(2)  # not started by `vlmtune launch`: nothing to write, no error
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    for rank, code in (("3", 75), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        report_exit_code(code)
    assert workers_exit_code(tmp_path, 1) == 75
