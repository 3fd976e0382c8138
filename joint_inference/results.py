"""Run state that survives interruption, and the results files of a run directory."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from .distributed import is_main_process
from .errors import ConfigError
from .utils import atomic_write_json, atomic_write_text, differing_keys

log = logging.getLogger(__name__)


def fingerprint_digest(obj: Any) -> str:
    """Short stable hash of JSON-able data (e.g. the sampled rows)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """Finished stages of a run, written atomically after each one.

    Starting again in the same run directory skips what is finished. The fingerprint holds
    everything that determines the results; a mismatch is an error naming the keys.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.stages: dict[str, Any] = {}
        self.seconds = 0.0
        self.prompts = 0
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            differ = differing_keys(fingerprint, saved["fingerprint"])
            if differ:
                raise ConfigError(
                    f"{self.path.parent} holds a run with a different configuration (keys differ: {differ}); "
                    "use a new run directory (hydra.run.dir=...) or the original settings"
                )
            self.stages, self.seconds, self.prompts = saved["stages"], saved["seconds"], saved["prompts"]
            log.info("resuming %s: finished stages %s", self.path.parent, list(self.stages))
        self.fingerprint = fingerprint

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    def __getitem__(self, stage: str):
        return self.stages[stage]

    def finish(self, stage: str, value, seconds: float, prompts: int) -> None:
        self.stages[stage] = value
        self.seconds += seconds
        self.prompts += prompts
        if is_main_process():
            atomic_write_json(self.path, {"fingerprint": self.fingerprint, "stages": self.stages,
                                          "seconds": self.seconds, "prompts": self.prompts})


def markdown_table(results: dict) -> str:
    """A one-run summary: rows of accuracies (majority vote; mean ± std over repeats when there are several)."""
    lines = [f"# {results['task']} / {results['model']}", "",
             "| stage | test accuracy | test, mean ± std over repeats | train accuracy |", "| --- | --- | --- | --- |"]

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    def row(name, r):
        spread = f"{pct(r['test_accuracy_mean'])} ± {100 * r['test_accuracy_std']:.1f}" if "test_accuracy_mean" in r else ""
        lines.append(f"| {name} | {pct(r['test_accuracy'])} | {spread} | {pct(r.get('train_accuracy'))} |")

    row("zero-shot", results["zero_shot"])
    if results.get("supervised_icl"):
        row("supervised ICL", results["supervised_icl"])
    for r in results["rounds"]:
        row(f"unsupervised ICL, round {r['round']}", r)
    t = results["timing"]
    lines += ["", f"{t['prompts_scored']} prompts scored in {t['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, results: dict, table: Callable[[dict], str] = markdown_table) -> None:
    """results.json and results.md (``table`` of the results), each written atomically (by the main process only)."""
    if not is_main_process():
        return
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", table(results))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    if not is_main_process():
        return
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
