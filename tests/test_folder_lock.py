"""The output folder's lock: ``-num_parts`` runs that share an output folder rebuild its score tables and its
review report one at a time.

POSIX record locks belong to a process, so every probe of the lock runs in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_reports import make_review_folder

from nnunet_ood.io.folder_lock import folder_lock, lock_path

fcntl = pytest.importorskip("fcntl")  # the probes use POSIX locks

TESTS = Path(__file__).resolve().parent


def lock_is_free(folder: Path) -> bool:
    """Whether another process can take the folder's lock right now (a non-blocking try in a child)."""
    probe = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(lock_path(str(folder)))!r}, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(3)
    """)
    code = subprocess.run([sys.executable, "-c", probe]).returncode
    assert code in (0, 3), f"the lock probe failed with exit code {code}"
    return code == 0


def test_lock_is_held_inside_the_block_and_released_after(tmp_path) -> None:
    assert lock_is_free(tmp_path)
    with folder_lock(str(tmp_path)):
        assert not lock_is_free(tmp_path)
    assert lock_is_free(tmp_path)
    with pytest.raises(RuntimeError):  # released on an exception too
        with folder_lock(str(tmp_path)):
            raise RuntimeError("boom")
    assert lock_is_free(tmp_path)


def test_review_report_waits_for_the_folder_lock(tmp_path) -> None:
    images, output = make_review_folder(tmp_path)
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from nnunet_ood.cli.predict import write_review_report
        print("ready", flush=True)
        write_review_report({str(images)!r}, {str(output)!r}, None)
    """)
    page = output / "review.html"
    with folder_lock(str(output)):
        child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"  # imports done: only the lock holds it back
            deadline = time.monotonic() + 5.0  # far longer than the report of 5 tiny cases takes
            while time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.1)
            assert child.poll() is None and not page.exists(), "the report was written while the lock was held"
        except BaseException:
            child.kill()
            raise
    assert child.wait(timeout=120) == 0
    assert page.is_file() and (output / "review_files").is_dir()


def test_score_tables_are_collected_and_written_under_the_lock(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    import nnunet_ood.inference.outputs as outputs_module

    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(outputs_module, "collect_records",
                        lambda folder, cases, signature: seen.append(("collect", lock_is_free(tmp_path))) or [])
    monkeypatch.setattr(outputs_module, "write_score_tables",
                        lambda folder, *args: seen.append(("write", lock_is_free(tmp_path))))
    outputs = outputs_module.PredictionOutputs(SimpleNamespace(ood_methods=[]))
    monkeypatch.setattr(outputs, "run_signature", lambda: "signature")
    monkeypatch.setattr(outputs, "table_metadata", lambda input_folder: {})
    outputs._run = {"output_folder": str(tmp_path), "cases": [], "input_folder": None}
    outputs.end_run()
    assert seen == [("collect", False), ("write", False)]
    assert lock_is_free(tmp_path)
