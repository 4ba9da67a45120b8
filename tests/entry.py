"""Running the entry points as a user does, for the tests: in-process through ``runpy`` where that is enough (the
interpreter and k-diffusion are already loaded, so a case costs milliseconds), and the one-line-error check."""
import contextlib
import io
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run_entry(script: str, *args, stdout: bool = False) -> tuple[int, str]:
    """Run ``launch/SCRIPT.py ARGS`` in this process; return its exit code and its stderr (with ``stdout``, both)."""
    done = run_captured(script, *args)
    return done.returncode, (done.stdout + done.stderr) if stdout else done.stderr


def assert_one_line(code: int, err: str, fragment: str) -> None:
    """Exit 2, no traceback, and exactly one error line, which holds ``fragment``."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and fragment in errors[0], err


def run_captured(script: str, *args) -> SimpleNamespace:
    """Run ``launch/SCRIPT.py ARGS`` in this process like ``subprocess.run(..., capture_output=True, text=True)``:
    returns its ``returncode``, ``stdout`` and ``stderr``."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = [str(ROOT / "launch" / f"{script}.py"), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
