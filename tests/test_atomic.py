"""Crash safety of ``artifacts.atomic``: a save killed at any step leaves RUN_DIR holding the old model or
the new one, never neither, and ``recover`` (run by the next save, and before a load) clears the rest.

Each kill is injected deterministically: a child process replaces RUN_DIR with the file-system calls
(``os.mkdir``, ``os.rename``, ``os.replace``, ``os.unlink``, ``os.rmdir``, ``os.fsync``, the atomic
exchange, and each file the save writes) counted, and ``os._exit``s just before call N, for every N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fusion_engine.artifacts.atomic as atomic
from fusion_engine.artifacts.atomic import atomic_directory, recover

ATOMIC_PY = Path(atomic.__file__)
OLD = {"model.safetensors": b"old" * 1000, "manifest.json": b'{"old": 1}'}
NEW = {"model.safetensors": b"new" * 2000, "manifest.json": b'{"new": 1}', "signature.json": b"{}"}
KILLED = 9

# The child loads atomic.py on its own (stdlib only: no torch, a fast start), counts the calls, and dies
# before call number KILL_AT (0: never). It prints the number of calls it made when it finishes.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    from pathlib import Path

    module_file, run_dir, mode, kill_at, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    spec = importlib.util.spec_from_file_location("atomic_under_test", module_file)
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    calls = 0

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os._exit(9)
            return fn(*args, **kwargs)
        return wrapper

    if mode == "rename":
        atomic._exchange = lambda a, b: False  # a platform or file system without RENAME_EXCHANGE
    atomic._exchange = counted("exchange", atomic._exchange)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync"):
        setattr(os, name, counted(name, getattr(os, name)))
    write = counted("write", lambda path, data: path.write_bytes(data))
    with atomic.atomic_directory(run_dir) as tmp:
        for name, data in json.loads(new).items():
            write(tmp / name, data.encode("latin-1"))
    print(calls)
    """
)


def save_in_child(run: Path, mode: str, kill_at: int) -> subprocess.CompletedProcess:
    new = json.dumps({k: v.decode("latin-1") for k, v in NEW.items()})
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(ATOMIC_PY), str(run), mode, str(kill_at), new],
        capture_output=True,
        text=True,
        timeout=60,
    )


def exchange_supported(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return atomic._exchange(folder / "a", folder / "b")
    finally:
        (folder / "a").rmdir()
        (folder / "b").rmdir()


def count_steps(folder: Path, mode: str, existing: bool = True) -> int:
    """The calls a whole save makes (over an existing RUN_DIR or none), from a run killed nowhere."""
    run = folder / f"dry-{mode}-{existing}" / "run"
    if existing:
        write_model(run, OLD)
    else:
        run.parent.mkdir()
    done = save_in_child(run, mode, 0)
    assert done.returncode == 0 and snapshot(run) == NEW, done.stderr
    return int(done.stdout)


def write_model(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def beside(run: Path) -> list[str]:
    return sorted(p.name for p in run.parent.iterdir())


@pytest.mark.parametrize("mode", ["exchange", "rename"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace-old-model", "first-save"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_model(tmp_path, mode, existing):
    if mode == "exchange" and not exchange_supported(tmp_path):
        pytest.skip("this platform or file system has no RENAME_EXCHANGE")
    steps = count_steps(tmp_path, mode, existing)
    assert steps >= 8  # mkdir, three writes, fsyncs, the swap, the clean-up
    outcomes = []
    for kill_at in range(1, steps + 1):
        run = tmp_path / f"kill-{kill_at}" / "run"
        if existing:
            write_model(run, OLD)
        else:
            run.parent.mkdir()
        proc = save_in_child(run, mode, kill_at)
        assert proc.returncode == KILLED, (kill_at, proc.stderr)
        before = snapshot(run)
        if mode == "exchange":  # one atomic swap: RUN_DIR is whole even before any recovery
            assert before in ((OLD if existing else None), NEW), kill_at
        recover(run)
        after = snapshot(run)
        assert after in ((OLD if existing else None), NEW), kill_at
        assert beside(run) == (["run"] if after is not None else []), (kill_at, beside(run))
        outcomes.append("new" if after == NEW else "old")
    # Every kill before the swap keeps the old model, every kill after it has the new one; both happen.
    assert outcomes == sorted(outcomes, key=["old", "new"].index) and {"old", "new"} == set(outcomes), outcomes


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_the_next_save_recovers_by_itself(tmp_path, mode):
    run = tmp_path / "live" / "run"
    write_model(run, OLD)
    steps = count_steps(tmp_path, mode)
    for kill_at in range(1, steps + 1):  # one crash after another, each cleared by the next save
        assert save_in_child(run, mode, kill_at).returncode == KILLED
        with atomic_directory(run) as tmp:
            assert beside(run) == sorted(["run", tmp.name])  # nothing left from the killed save
            for name, data in OLD.items():
                (tmp / name).write_bytes(data)
        assert snapshot(run) == OLD and beside(run) == ["run"]


def test_a_killed_save_between_the_two_renames_is_restored(tmp_path):
    """The case of issue #17: RUN_DIR renamed away, the new folder not yet renamed in."""
    run = tmp_path / "live" / "run"
    write_model(run, OLD)
    steps = count_steps(tmp_path, "rename")
    for kill_at in range(1, steps + 1):
        save_in_child(run, "rename", kill_at)
        if not run.exists():
            break
        recover(run)
    else:
        pytest.fail("no kill point left RUN_DIR missing: the two-rename path was not exercised")
    stranded = [name for name in beside(run) if ".old-" in name]
    unfinished = [name for name in beside(run) if name.endswith(".tmp")]
    assert len(stranded) == 1 and snapshot(run.parent / stranded[0]) == OLD and len(unfinished) == 1
    assert recover(run) == [
        f"restored {run} from {stranded[0]} (a save was interrupted)",
        f"removed {unfinished[0]} (left by an interrupted save)",
    ]
    assert snapshot(run) == OLD and beside(run) == ["run"]


def test_leftovers_of_the_earlier_two_rename_code_are_restored_and_removed(tmp_path):
    run = tmp_path / "run"
    write_model(tmp_path / ".run.old-4242", OLD)  # what the code before this change left when killed
    write_model(tmp_path / ".run.abcd1234.tmp", NEW)
    write_model(tmp_path / ".run.checkpoint.abcd1234.tmp", NEW)  # another folder's: not this one's to touch
    recover(run)
    assert snapshot(run) == OLD
    assert beside(run) == [".run.checkpoint.abcd1234.tmp", "run"]
    write_model(tmp_path / ".run.old-17-99", NEW)  # RUN_DIR is there: a stale old copy is only removed
    assert recover(run) == ["removed .run.old-17-99 (left by an interrupted save)"]
    assert snapshot(run) == OLD and recover(run) == []


def test_recover_that_cannot_rename_leaves_everything_and_does_not_raise(tmp_path, monkeypatch):
    """A load from a folder it may not write to must still get to its own clear error."""
    run = tmp_path / "run"
    write_model(tmp_path / ".run.old-5-5", OLD)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    assert recover(run) == [f"could not restore {run} from .run.old-5-5: Permission denied"]
    assert beside(run) == [".run.old-5-5"]
    assert recover(tmp_path / "no-such-folder" / "run") == []


def test_recover_never_touches_a_save_in_progress(tmp_path):
    """A live writer (here another process, waiting on its stdin) holds a lock on its folder."""
    run = tmp_path / "run"
    write_model(run, OLD)
    script = textwrap.dedent(
        """
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("atomic_under_test", sys.argv[1])
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)
        with atomic.atomic_directory(sys.argv[2]) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            print(tmp.name, flush=True)
            sys.stdin.readline()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(ATOMIC_PY), str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        tmp_name = child.stdout.readline().strip()
        assert tmp_name.startswith(".run.") and tmp_name.endswith(".tmp")
        assert recover(run) == [] and (tmp_path / tmp_name / "model.safetensors").is_file()
        with atomic_directory(run) as mine:  # a second save beside it leaves it alone too
            (mine / "model.safetensors").write_bytes(b"mine")
        assert (tmp_path / tmp_name).is_dir()
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert snapshot(run) == {"model.safetensors": b"new"} and beside(run) == ["run"]


@pytest.mark.parametrize("mode", ["exchange", "rename"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, OSError])
def test_an_exception_at_any_step_keeps_the_old_or_the_new_model(tmp_path, monkeypatch, mode, error):
    """In-process failures (Ctrl-C, sys.exit, a full disk) at call N. After Ctrl-C or sys.exit the
    handler itself has restored and cleaned up; an OSError in a clean-up step is ignored there and
    its remains go at the next recover."""
    if mode == "rename":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    calls = {"n": 0, "fail_at": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise error("injected")
            return fn(*args, **kwargs)

        return wrapper

    def attempt(run: Path, fail_at: int) -> str:
        calls.update(n=0, fail_at=0)
        write_model(run, OLD)
        calls.update(n=0, fail_at=fail_at)
        try:
            with atomic_directory(run) as tmp:
                for name, data in NEW.items():
                    (tmp / name).write_bytes(data)
        except error:
            raised = True
        else:
            raised = False
        finally:
            calls["fail_at"] = 0
        assert snapshot(run) in (OLD, NEW), fail_at
        if error is not OSError:
            assert raised == (fail_at > 0) and beside(run) == ["run"], (fail_at, beside(run))
        recover(run)
        assert beside(run) == ["run"], (fail_at, beside(run))
        return "new" if snapshot(run) == NEW else "old"

    monkeypatch.setattr(atomic, "_exchange", counted(atomic._exchange))
    for name in ("mkdir", "rename", "unlink", "rmdir", "fsync"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    assert attempt(tmp_path / "dry" / "run", 0) == "new"
    steps = calls["n"]
    outcomes = [attempt(tmp_path / f"fail-{n}" / "run", n) for n in range(1, steps + 1)]
    assert {"old", "new"} == set(outcomes), outcomes
    if error is not OSError:  # an OSError some steps tolerate (an existing parent, a folder fsync) saves the new
        assert outcomes == sorted(outcomes, key=["old", "new"].index), outcomes


def test_a_file_or_link_at_the_target_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    for name in ("file", "link"):
        with pytest.raises(FileExistsError, match="exists and is not a folder"):
            with atomic_directory(tmp_path / name):
                pytest.fail("the body must not run")
    assert beside(tmp_path / "file") == ["file", "folder", "link"]


def test_atomic_write_bytes_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sig.json"
    atomic.atomic_write_bytes(target, b"one")
    atomic.atomic_write_text(target, "two")
    assert target.read_text() == "two" and beside(target) == ["sig.json"]
