"""Results are written whole: never half a file, never private to their writer."""
import os

from clipfromscratch.outputs import write_dir_atomic, write_text_atomic


def test_results_written_whole_are_as_readable_as_ordinary_files(tmp_path):
    """Other users of a cluster read exports and reports: the temporary names must not leave them private."""
    os.umask(old := os.umask(0o022))
    try:
        write_text_atomic(str(tmp_path / "report.md"), "# report")
        write_dir_atomic(str(tmp_path / "final"), lambda folder: open(os.path.join(folder, "w"), "w").close())
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
    write_dir_atomic(str(tmp_path / "final"), lambda folder: open(os.path.join(folder, "new"), "w").close())
    assert sorted(os.listdir(tmp_path / "final")) == ["new"]  # the old folder replaced whole
    assert sorted(os.listdir(tmp_path)) == ["final", "report.md"]  # no temporary names left behind
