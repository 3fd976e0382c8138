"""What the entry scripts share: ``--help`` written from their configs, a quiet hub when it cannot be
reached, newlines in templates typed on the command line, one run at a time in a run directory, bad
input as ``error: ...`` (exit code 2) from the command line on, and the results table at the end of a run.

Importing this module registers the ``script_help`` resolver that the primary configs' help
templates call; the entry scripts import it before Hydra reads a config.
"""
from __future__ import annotations

import difflib
import logging
import re
import sys
import textwrap
from functools import reduce
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..core.distributed import is_main_process
from ..core.errors import ConfigError, exit_on_config_error
from ..core.utils import check_writable_dir
from .config import SCHEMAS, config_option, options, own_keys
from .rundir import run_directory

log = logging.getLogger(__name__)
HUB_RETRIES = re.compile(r"thrown while requesting|^Retrying in|^Rate limited")
# what an API key or access token looks like (OpenAI, Hugging Face, GitHub): never a setting's value
KEY_LIKE = re.compile(r"(?<![A-Za-z0-9])(sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|(ghp|github_pat)_[A-Za-z0-9_]{20,})")


# ------------------------------------------------------------------------------------ the run
def launch(main) -> None:
    """An entry script's ``__main__``: the command line checked (:func:`check_command_line`), then the
    ``@hydra.main`` function ``main``."""
    sys.argv[1:] = quote_typed_templates(sys.argv[1:])
    script = Path(sys.argv[0]).resolve()
    exit_on_config_error(lambda args: check_command_line(args, script.parent / "configs", SCHEMAS.get(script.stem)),
                         sys.argv[1:])
    main()


def quote_typed_templates(args: list[str]) -> list[str]:
    """``template.text={text}\\nIt was {y}.`` as the shell passes it on (the user's quotes already
    removed) quoted for Hydra, whose grammar would read ``{text}`` as a dictionary and stop. A value
    that Hydra quotes already (``'...'`` or ``"..."``) is left as it is."""
    quoted = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") == "template.text" and value and not (
                len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
            # Hydra's quoted strings: a quote is escaped by a backslash, and so is a run of backslashes before one
            value = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def check_command_line(args: list[str], config_dir: Path, schema: type | None = None) -> None:
    """What Hydra reads before a script's code runs and reports as a page of text with exit code 1, or
    a traceback: an option of a config group that ``config_dir`` lacks (``dataset=sst3``), and a run
    (or, with ``-m``, sweep) directory that cannot be created or written. Left to Hydra: other config
    folders (``--config-dir``), Hydra's own groups, values it interpolates. First of all, a value that looks
    like an API key: Hydra would write it into the run directory's ``.hydra`` record, so it is refused (without
    being echoed) before anything is written."""
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and KEY_LIKE.search(value):
            raise ConfigError(f"{key.lstrip('+~')}= holds what looks like an API key; a key is never a setting (it "
                              "would be written to the run directory): export it in the environment (OPENAI_API_KEY, "
                              "or the variable that model.api_key_env names) and leave it off the command line. "
                              "Nothing was written")
    if any(arg.split("=")[0] in ("-cp", "--config-path", "-cd", "--config-dir") for arg in args):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import OverrideParseException

    directory_key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    running = not any(arg.startswith(("--help", "-h", "--hydra-help", "--cfg", "-c", "--info")) for arg in args)
    if running and not any(arg.split("=")[0] == directory_key for arg in args):  # Hydra's default: a folder here
        check_writable_dir("multirun" if directory_key == "hydra.sweep.dir" else "outputs", directory_key)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = OverridesParser.create().parse_overrides([arg])[0]
        except OverrideParseException:
            key, _, value = arg.partition("=")
            if not value.isascii():  # Hydra's lexer stops at the first letter beyond ASCII, with no hint
                items = value[1:-1].split(",") if value[:1] == "[" and value[-1:] == "]" else None
                quoted = ("[" + ",".join(f'"{item.strip()}"' for item in items) + "]" if items is not None
                          else f'"{value}"')
                raise ConfigError(f"{key}={value}: an unquoted value may hold ASCII characters only; quote the text, "
                                  f"e.g. '{key}={quoted}' (in single quotes for the shell)") from None
            continue  # Hydra says what is wrong with the syntax
        key, value = override.key_or_group, override.value()
        if key == directory_key and isinstance(value, str) and "${" not in value:
            check_writable_dir(value, key)
        if schema and "." not in key and not override.is_add() and not (config_dir / key).is_dir():
            known = own_keys(schema)
            if key not in known:  # Hydra would say "not in struct" with a page of text
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                  + f" The settings of this script: {', '.join(sorted(known))}")
        if key.startswith("hydra") or not (config_dir / key).is_dir():
            continue
        valid = options(key, config_dir)
        chosen = (list(override.sweep_string_iterator()) if isinstance(value, ChoiceSweep)
                  else [value] if isinstance(value, str) else [])
        for option in chosen:
            if "${" not in option and option not in valid:
                raise ConfigError(f"unknown {key} {option!r}; valid: {', '.join(valid)}")


def run_script(run, cfg: DictConfig) -> None:
    """An entry script's body: ``run(cfg)`` holding its run directory (:mod:`~joint_inference.runs.rundir`),
    with bad input as ``error: ...`` and Ctrl-C as one line saying what is kept, then the results table that
    the run wrote to results.md, printed so that it is the last thing on the console."""
    typed_newlines(cfg)
    hub, quiet = logging.getLogger("huggingface_hub.utils._http"), OneHubRetryLine()
    hub.addFilter(quiet)
    try:
        exit_on_config_error(lambda cfg: run_in_directory(run, cfg), cfg)
    except KeyboardInterrupt:
        print(f"interrupted: what finished is kept in {cfg.output_dir} (each finished stage, the answers an API "
              "returned, the last checkpoint); start the same command again to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        hub.removeFilter(quiet)
    table = Path(cfg.output_dir) / "results.md"
    if is_main_process() and table.exists():
        print(f"\n{table}:\n\n{table.read_text()}")


def run_in_directory(run, cfg: DictConfig):
    """``run(cfg)`` holding ``cfg.output_dir`` for this entry script (Hydra's job name), with the ``.hydra``
    record that Hydra wrote there when the output directory is Hydra's run directory."""
    from hydra.core.hydra_config import HydraConfig

    if "include_path" in cfg.dataset:  # an lm-eval task and the settings it allows are checked before the run
        from .config import read_settings  # directory is held: a task that cannot run leaves nothing behind
        from .root import with_lm_eval_task

        with_lm_eval_task(read_settings(cfg))
    hydra = HydraConfig.get()
    hydra_out, out = Path(hydra.runtime.output_dir).resolve(), Path(cfg.output_dir).resolve()
    ours = hydra_out == out and hydra.output_subdir
    inside = hydra_out.relative_to(out).parts[0] if out in hydra_out.parents else None  # Hydra's, not the user's
    with run_directory(cfg.output_dir, hydra.job.name,
                       Path(hydra.runtime.output_dir) / hydra.output_subdir if ours else None, inside):
        return run(cfg)


class OneHubRetryLine(logging.Filter):
    """huggingface_hub logs two warnings per retry (five retries per file, several files per model)
    when the hub cannot be reached; one line says so, and the ``error:`` that follows says the rest."""

    def __init__(self):
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not HUB_RETRIES.search(record.getMessage()):
            return True
        if not self.said:
            self.said = True
            log.warning("cannot reach the Hugging Face hub (%s); retrying quietly", record.getMessage())
        return False


def typed_newlines(cfg: DictConfig) -> None:
    """Turn ``\\n`` into a newline in the template keys set on the command line.

    Hydra keeps a quoted ``'{sentence}\\nIt was {y}.'`` as backslash-n, which would reach the model as
    two characters. Only command-line values change: a template in a YAML file already has its
    escapes read by YAML (and may hold a literal backslash, e.g. ``\\neq`` in a maths prompt).
    """
    from hydra.core.hydra_config import HydraConfig

    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        value = OmegaConf.select(cfg, key, default=None)
        if key.startswith("template.") and isinstance(value, str):
            OmegaConf.update(cfg, key, value.replace("\\n", "\n"))


# ---------------------------------------------------------------------------------------- --help
def script_help(modality: str, kinds: list[str], *, _root_: DictConfig) -> str:
    """``--help`` of an entry script (its primary config's ``hydra.help.template``): the config's
    header comment, each of its keys with the value it has now and the comment beside it in the
    YAML, and the options of each config group that fit the script's ``modality`` and ``kinds``
    of task."""
    hydra = _root_.hydra
    config_dir = Path(next(s.path for s in hydra.runtime.config_sources if s.provider == "main"))
    name = hydra.job.config_name
    written = OmegaConf.to_container(_root_, resolve=False)  # values as written: ${...} stays
    lines = header_comment(config_dir / f"{name}.yaml") + ["", "Keys (key=value on the command line):"]
    meanings, groups = key_meanings(config_dir, name), config_groups(config_dir, name)
    for key, meaning in meanings.items():
        setting = f"  {key}={override_value(reduce(dict.__getitem__, key.split('.'), written))}"
        lines.append(f"{setting:<34} {meaning}" if len(setting) < 34 else f"{setting}  {meaning}")
    lines += ["", "Config groups (group=option; * marks the one chosen now):"]
    script_keys = {key.split(".")[0] for key in meanings} | set(groups)
    for group in [*groups, "experiment"]:
        fitting = [option for option in options(group, config_dir)
                   if option_applies(config_dir, group, option, modality, kinds, script_keys)]
        if fitting:
            chosen = hydra.runtime.choices.get(group)
            listed = ", ".join(option + "*" * (option == chosen) for option in fitting)
            label = f"  {'+' * (group == 'experiment')}{group}: "
            lines.append(textwrap.fill(listed, 100, initial_indent=label, subsequent_indent=" " * len(label)))
    lines += ["", "The composed config: --cfg job. Sweeps: -m key=a,b (hydra/launcher=slurm on a cluster).",
              "Hydra's own options: --hydra-help."]
    return "\n".join(lines).replace("$", "$$") + "\n"  # the text goes through string.Template


def header_comment(path: Path) -> list[str]:
    """The comment lines at the top of a config file, without their ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def key_meanings(config_dir: Path, name: str) -> dict[str, str]:
    """{dotted key: the comment on its line} of a primary config and of the primary configs it extends
    (its own comments win), leaving out ``defaults`` and ``hydra``."""
    meanings = {}
    for base in extended_configs(config_dir, name):
        meanings.update(key_meanings(config_dir, base))
    parents, skipping = [], False
    for line in (config_dir / f"{name}.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        if indent == 0:
            skipping = key in ("defaults", "hydra")
        if skipping:
            continue
        parents = [(i, k) for i, k in parents if i < indent]
        value, _, comment = rest.partition(" #")
        if value.strip():
            meanings[".".join([k for _, k in parents] + [key])] = comment.strip()
        else:
            parents.append((indent, key))
    return meanings


def defaults_list(config_dir: Path, name: str) -> list:
    return list(OmegaConf.load(config_dir / f"{name}.yaml").get("defaults", []))


def extended_configs(config_dir: Path, name: str) -> list[str]:
    """The primary configs that ``name`` extends (plain entries of its defaults list)."""
    return [entry for entry in defaults_list(config_dir, name) if isinstance(entry, str) and entry != "_self_"]


def config_groups(config_dir: Path, name: str) -> list[str]:
    """The config groups of ``name``'s defaults list and those of the configs it extends, in order."""
    groups = [group for base in extended_configs(config_dir, name) for group in config_groups(config_dir, base)]
    for entry in defaults_list(config_dir, name):
        if not isinstance(entry, str):
            group = next(iter(entry)).removeprefix("override ").strip("/")
            groups += [group] * (group not in groups and "/" not in group and group != "experiment")
    return groups


def option_applies(config_dir: Path, group: str, option: str, modality: str, kinds: list[str],
                   script_keys: set[str]) -> bool:
    """Whether ``group=option`` fits a script of ``modality`` running ``kinds`` of task: a model or a
    data set of that modality (and kind), a template or label set of such a data set (the one it is
    named after), GSM8K's prompt styles where generation runs, an experiment preset whose keys the
    script has and whose overrides fit."""
    if group == "experiment":  # a preset: its keys and the group options its defaults list overrides
        preset = OmegaConf.load(config_dir / group / f"{option}.yaml")
        overrides = [next(iter(entry.items())) for entry in preset.get("defaults", []) if not isinstance(entry, str)]
        return all(key == "defaults" or key in script_keys for key in preset) and all(
            option_applies(config_dir, target.removeprefix("override /"), value, modality, kinds, script_keys)
            for target, value in overrides)
    cfg = config_option(group, option, config_dir)
    if group == "model":
        return ("image" if "image_features" in cfg else "text") == modality
    if group == "dataset":
        return cfg.modality == modality and cfg.kind in kinds
    if group in ("template", "labelset"):
        datasets = sorted(options("dataset", config_dir), key=len, reverse=True)
        named_after = next((d for d in datasets if option == d or option.startswith(d + "_")), None)
        return named_after is not None and option_applies(config_dir, "dataset", named_after, modality, kinds,
                                                          script_keys)
    if group == "prompt_style":
        return "generation" in kinds
    return True


def override_value(value) -> str:
    """A config value as the command line writes it (``[a,b]``, ``null``, ``true``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(override_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


OmegaConf.register_new_resolver("script_help", script_help)
