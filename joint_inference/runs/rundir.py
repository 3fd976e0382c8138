"""One run at a time in a run directory, of one entry script, and a ``.hydra`` record that keeps
describing what is there.

Hydra rewrites ``<run dir>/.hydra`` (the config and the overrides) before a script's code runs, so
a rerun that is then refused (other settings, another script, a run still going) would leave a
record of settings that produced nothing there. The directory keeps two copies under ``.run/``:
``results`` (the record of the run whose results it holds: the first run's, then each finished
run's) and ``running`` (the record of the run holding it now). A run refused while another holds the
directory puts ``running`` back; one refused for what it found there, ``results``.

``.run/lock`` is locked (``flock``) for the whole run: the lock goes with the process, so a killed
run leaves none behind; the file names the holder for the message that refuses a second run.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.distributed import process_state
from ..core.errors import ConfigError
from ..core.utils import TEMPORARY, atomic_write, atomic_write_json, read_json

RECORD = ".run"  # lock, run.json (the entry script), results/ and running/ (copies of .hydra)
NOT_RESULTS = (".hydra", RECORD)  # with the logs, what a directory holds before any result


@contextmanager
def run_directory(directory: str | Path, entry: str, hydra_dir: Path | None, hydra_folder: str | None = None):
    """Hold ``directory`` for a run of the entry script ``entry`` (its name, e.g. ``unsupervised_icl_llm``).

    Refused with a ConfigError: a directory that cannot be written, one held by a running process, one
    holding the results of another entry script. ``hydra_dir``: the ``.hydra`` folder that Hydra wrote
    for this run in ``directory`` (None when it writes none there); ``hydra_folder``: the folder of
    ``directory`` that holds Hydra's run directory, where that lies inside it. A ConfigError in the run (other
    settings, bad data) puts the record of the results back; a finished run's record becomes it. Under
    several processes the main one holds the directory and tells the others what it decided, so that
    all stop together.
    """
    directory = Path(directory)
    state = process_state()
    held, refusal = None, None
    if state.is_main_process:
        try:
            held = hold(directory, entry, hydra_dir, hydra_folder)
        except ConfigError as err:
            refusal = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise ConfigError(refusal)
    try:
        yield
    except ConfigError:
        if held:
            restore(directory, "results", hydra_dir)
        raise
    else:
        if held:
            save_copy(directory, "results", held[1])
    finally:
        if held:
            held[0].close()


def hold(directory: Path, entry: str, hydra_dir: Path | None, hydra_folder: str | None = None):
    """(the locked lock file, this run's ``.hydra`` files) of a directory that this run may use; on
    refusal the directory's ``.hydra`` record is put back."""
    try:
        (directory / RECORD).mkdir(parents=True, exist_ok=True)
        lock = open(directory / RECORD / "lock", "a+")  # noqa: SIM115 (held open, hence locked, for the whole run)
    except OSError as err:
        raise ConfigError(f"cannot write the output directory {directory} ({err.strerror}); choose another one "
                          "with hydra.run.dir=... (or output_dir=...)") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not yet said which"
        lock.close()
        restore(directory, "running", hydra_dir)
        raise ConfigError(f"{directory} is in use by another run ({holder}); wait for it to end, or use another "
                          "run directory (hydra.run.dir=...)") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    ours = {p.name: p.read_bytes() for p in sorted(hydra_dir.glob("*.yaml"))} if hydra_dir else {}
    save_copy(directory, "running", ours)
    try:
        claim(directory, entry, ours, hydra_folder)
    except ConfigError:
        lock.close()
        restore(directory, "results", hydra_dir)
        raise
    for stale in directory.rglob(TEMPORARY):  # a write that was killed before its rename (this run holds the lock)
        stale.unlink(missing_ok=True)
    return lock, ours


def claim(directory: Path, entry: str, ours: dict[str, bytes], hydra_folder: str | None = None) -> None:
    """Record ``entry`` and this run's ``.hydra`` files as the directory's, unless it holds results: then
    they must be ``entry``'s, and their record stays until this run finishes. Files that no run of this
    project wrote (no record says so) are never overwritten: such a directory is refused."""
    saved = directory / RECORD / "run.json"
    others = sorted(p.name for p in directory.iterdir()
                    if p.name not in (*NOT_RESULTS, hydra_folder) and p.suffix != ".log")
    if others and not saved.exists():
        raise ConfigError(f"{directory} holds files that no run of this project wrote ({', '.join(others[:5])}"
                          f"{', ...' if len(others) > 5 else ''}); a run would overwrite them. Use a new or empty run "
                          "directory (hydra.run.dir=...), or move those files away")
    if not others:
        atomic_write_json(saved, {"entry": entry})
        save_copy(directory, "results", ours)
        return
    theirs = read_json(saved, "delete it (the results stay) or use a new run directory (hydra.run.dir=...)")["entry"]
    if theirs != entry:
        raise ConfigError(f"{directory} holds the results of {theirs}.py; {entry}.py does not add to them. "
                          "Use a new run directory (hydra.run.dir=...)")


def save_copy(directory: Path, name: str, files: dict[str, bytes]) -> None:
    """``files`` (file name: content) as the directory's copy ``name`` of a ``.hydra`` record."""
    for file, content in files.items():
        atomic_write(directory / RECORD / name / file, lambda f, content=content: f.write(content), binary=True)


def restore(directory: Path, name: str, hydra_dir: Path | None) -> None:
    """The directory's copy ``name`` of a ``.hydra`` record back in ``hydra_dir``, over what this run's Hydra
    wrote."""
    if hydra_dir is None:
        return
    for copy in sorted((directory / RECORD / name).glob("*.yaml")):
        content = copy.read_bytes()
        atomic_write(hydra_dir / copy.name, lambda f, content=content: f.write(content), binary=True)
