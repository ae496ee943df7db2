"""Hostile settings and output folders: refused before any work, and a result set is written as a whole.

A result is one folder in the output folder (``OUT/<name>/``), renamed into place when complete,
so a killed, stopped or failing run leaves the old complete set or the new one, never a mix.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_outcomes import assert_refused, run_cli
from sspect.io.volume_files import read_image

REPO = Path(__file__).resolve().parents[2]



def _reconstruct(capsys, small_study, out, *extra):
    return run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--out", out, "--iterations", "1", "--subsets", "2",
                "--formats", "nrrd", *extra)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


SETTINGS_REFUSED = [  # (case, options, words)
    ("seed negative", ["--seed", "-1"], ["seed", "0 to 4294967295"]),
    ("seed too large", ["--seed", str(2**32)], ["seed"]),
    ("calibration NaN", ["--calibration", "nan"], ["calibration", "finite"]),
    ("calibration infinite", ["--calibration", "inf"], ["calibration", "finite"]),
    ("calibration zero", ["--calibration", "0"], ["calibration"]),
    ("calibration negative", ["--calibration", "-9"], ["calibration"]),
    ("name with a parent folder", ["--name", "../x"], ["plain file name"]),
    ("name with a folder", ["--name", "a/b"], ["plain file name"]),
    ("name absolute", ["--name", "/tmp/x"], ["plain file name"]),
    ("name hidden", ["--name", ".x"], ["plain file name"]),
    ("name only dots", ["--name", ".."], ["plain file name"]),
    ("name too long", ["--name", "x" * 100_000], ["plain file name", "100000 characters"]),
    ("name with a Windows-forbidden character", ["--name", "a:b"], ["plain file name"]),
    ("name ending in a dot", ["--name", "image."], ["plain file name"]),
    ("name with a newline", ["--name", "a\nb"], ["plain file name"]),
    ("name empty", ["--name", ""], ["plain file name"]),
    ("binning zero", ["--binning", "0"], ["binning"]),
    ("format unknown", ["--formats", "nrrd,tiff"], ["format"]),
]


@pytest.mark.parametrize("options, words", [case[1:] for case in SETTINGS_REFUSED], ids=[case[0] for case in SETTINGS_REFUSED])
def test_bad_setting_refused_before_any_file(capsys, tmp_path, small_study, options, words):
    out = tmp_path / "out"
    assert_refused(*_reconstruct(capsys, small_study, out, *options), *words)
    assert not out.exists() or list(out.iterdir()) == []
    assert not (tmp_path / "x").exists()  # '../x' wrote nothing beside the output folder


def test_output_folder_that_is_a_file(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    out.write_text("in the way\n")
    assert_refused(*_reconstruct(capsys, small_study, out), "is a file")
    assert out.read_text() == "in the way\n"


def test_output_folder_under_a_file(capsys, tmp_path, small_study):
    (tmp_path / "file").write_text("")
    assert_refused(*_reconstruct(capsys, small_study, tmp_path / "file" / "out"), "part of its path is a file")


def test_output_folder_not_writable(capsys, small_study):
    assert_refused(*_reconstruct(capsys, small_study, "/sys/sspect-out"), "cannot be written")


def test_result_is_one_folder_named_after_the_result(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    code, stderr = _reconstruct(capsys, small_study, out, "--name", "liver", "--formats", "nrrd,dicom")
    assert code == 0, stderr
    assert _visible(out) == ["liver"] and _hidden(out) == []
    assert _visible(out / "liver") == ["liver.nrrd", "liver_dicom", "liver_preview.png", "liver_provenance.json",
                                        "liver_report.md"]
    provenance = json.loads((out / "liver" / "liver_provenance.json").read_text())
    assert all(Path(path).exists() and Path(path).parent == out / "liver" for path in provenance["files"].values())


def test_given_name_taken_is_refused_and_the_old_set_kept(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    assert _reconstruct(capsys, small_study, out, "--name", "liver")[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "liver").iterdir()}
    code, stderr = _reconstruct(capsys, small_study, out, "--name", "liver", "--iterations", "2")
    assert_refused(code, stderr, "already exists", "--overwrite")
    assert "%|" not in stderr  # refused before reconstructing: no progress bar was drawn
    assert {p.name: p.stat().st_mtime_ns for p in (out / "liver").iterdir()} == before
    assert _hidden(out) == []


def test_file_in_the_way_of_a_given_name_is_refused(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    out.mkdir()
    (out / "liver").write_text("notes\n")
    assert_refused(*_reconstruct(capsys, small_study, out, "--name", "liver"), "in the way")
    assert (out / "liver").read_text() == "notes\n" and _hidden(out) == []


def test_file_in_the_way_of_a_default_name_is_passed_by(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    out.mkdir()
    (out / "osem_1it_2ss").write_text("notes\n")
    assert _reconstruct(capsys, small_study, out)[0] == 0
    assert _visible(out) == ["osem_1it_2ss", "osem_1it_2ss_2"] and (out / "osem_1it_2ss").read_text() == "notes\n"


def test_overwrite_replaces_the_whole_set(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    assert _reconstruct(capsys, small_study, out, "--name", "liver", "--formats", "nrrd,nifti")[0] == 0
    assert _reconstruct(capsys, small_study, out, "--name", "liver", "--iterations", "2", "--overwrite")[0] == 0
    assert _visible(out / "liver") == ["liver.nrrd", "liver_preview.png", "liver_provenance.json", "liver_report.md"]
    assert json.loads((out / "liver" / "liver_provenance.json").read_text())["params"]["iterations"] == 2
    assert _hidden(out) == []


def test_default_names_are_numbered_instead_of_overwritten(capsys, tmp_path, small_study):
    out = tmp_path / "out"
    for _ in range(3):
        assert _reconstruct(capsys, small_study, out)[0] == 0
    assert _visible(out) == ["osem_1it_2ss", "osem_1it_2ss_2", "osem_1it_2ss_3"]
    assert _visible(out / "osem_1it_2ss_3")[0] == "osem_1it_2ss_3.nrrd"


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "SelfSupervisedSPECT"), "OMP_NUM_THREADS": "1"}


def _reconstruct_command(small_study, out, *extra) -> list[str]:
    return [sys.executable, "-m", "sspect", "reconstruct", "--nm", str(small_study["nm"]), "--out", str(out),
            "--subsets", "2", "--formats", "nrrd,dicom", *extra]


def test_two_runs_into_one_folder_keep_both_results(small_study, tmp_path):
    out = tmp_path / "out"
    runs = [subprocess.Popen(_reconstruct_command(small_study, out, "--iterations", "1"), env=_child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
        run.stderr.close()
    assert _visible(out) == ["osem_1it_2ss", "osem_1it_2ss_2"] and _hidden(out) == []
    for name in _visible(out):
        assert read_image(out / name / f"{name}.nrrd").array.shape == (32, 32, 32)


def test_sigterm_while_reconstructing_ends_with_one_sentence(small_study, tmp_path):
    """SIGTERM (what schedulers and process managers send first) unwinds like Ctrl-C."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(_reconstruct_command(small_study, out, "--iterations", "200", "--projector", "pytomography", "--name", "long"),
                                   env=_child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "it/s" not in log.read_text() and "%|" not in log.read_text():
            time.sleep(0.05)  # until the progress bar shows the iterations running
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    text = log.read_text()
    assert process.returncode == 143, text
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith("sspect: stopped by SIGTERM")
    assert _visible(out) == [] and _hidden(out) == []


def test_sigterm_while_writing_leaves_no_partial_set(small_study, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_reconstruct_command(small_study, out, "--iterations", "1", "--formats", "nrrd,nifti,dicom"),
                               env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not _hidden(out):
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=60)[1]
    assert "Traceback" not in stderr
    assert process.returncode in (0, 143), stderr  # 0: the set was complete before the signal came
    assert _hidden(out) == []
    assert _visible(out) == (["osem_1it_2ss"] if process.returncode == 0 else [])


def test_sigterm_ends_a_job_with_one_error_event(small_study, tmp_path):
    out = tmp_path / "out"
    job = {"version": 1, "nm": [str(small_study["nm"])], "output_dir": str(out), "method": "osem",
           "params": {"iterations": 200, "subsets": 2}, "projector": "pytomography", "formats": ["nrrd"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    process = subprocess.Popen([sys.executable, "-m", "sspect", "run-job", str(tmp_path / "job.json")], env=_child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress":
            process.send_signal(signal.SIGTERM)
            break
    events += [json.loads(line) for line in process.stdout]
    process.wait(timeout=60)
    process.stdout.close()
    assert process.returncode == 143
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and events[-1] is errors[0] and "SIGTERM" in errors[0]["message"]
    assert _visible(out) == [] and _hidden(out) == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_write_failure_keeps_the_old_set_whole(small_study, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run(_reconstruct_command(small_study, out, "--iterations", "1", "--name", "liver"),
                           env=_child_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (out / "liver").iterdir() if p.is_file()}
    second = subprocess.run(_reconstruct_command(small_study, out, "--iterations", "2", "--name", "liver", "--overwrite"),
                            env=_child_env(), capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("sspect: Writing")
    assert {p.name: p.read_bytes() for p in (out / "liver").iterdir() if p.is_file()} == before
    assert _hidden(out) == []


def test_killed_while_writing_over_an_old_set_leaves_one_whole_set(small_study, tmp_path):
    """SIGKILL at some moment of writing the new set: the visible set is the old one or the new one, complete."""
    out = tmp_path / "out"
    assert subprocess.run(_reconstruct_command(small_study, out, "--iterations", "1", "--name", "liver"),
                          env=_child_env(), capture_output=True, timeout=300).returncode == 0
    old = json.loads((out / "liver" / "liver_provenance.json").read_text())["params"]["iterations"]
    process = subprocess.Popen(_reconstruct_command(small_study, out, "--iterations", "3", "--name", "liver", "--overwrite"),
                               env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        partial = [out / name for name in _hidden(out) if ".partial-" in name]
        try:
            if partial and any("_dicom" in p.name for p in partial[0].iterdir()):
                break  # the DICOM series of the new set is being written
        except FileNotFoundError:
            break  # the new set was just renamed into place

        time.sleep(0.001)
    process.kill()
    process.wait(timeout=30)
    names = _visible(out / "liver")
    assert names[:1] == ["liver.nrrd"] and "liver_provenance.json" in names, names
    iterations = json.loads((out / "liver" / "liver_provenance.json").read_text())["params"]["iterations"]
    assert iterations in (old, 3)
    if iterations == old:
        assert "liver_dicom" in names and len(list((out / "liver" / "liver_dicom").iterdir())) == 32


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system (tmpfs), where the machine lets us mount one."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root in a machine that allows mounts")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_without_room_is_refused_before_reconstructing(capsys, small_study, small_disk):
    assert_refused(*_reconstruct(capsys, small_study, small_disk / "out"), "MB free", "free space")
    assert _visible(small_disk / "out") == [] and _hidden(small_disk / "out") == []
