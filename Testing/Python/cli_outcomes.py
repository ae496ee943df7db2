"""How the tests run `sspect` in this process and check that a refusal is one sentence."""
from sspect.cli import main


def run_cli(capsys, *argv):
    """Exit code and stderr of `sspect ARGV` run in this process."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_refused(code, stderr, *words):
    """Exit code 2; stderr ends with exactly one 'sspect: ...' line (warnings may come before it) holding every word."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sspect: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]
