"""Your own data (dataset=local): predict-only runs, labelled runs, bad input, readers, dry runs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from joint_inference.core.errors import ConfigError
from joint_inference.models.tiny import WORDS
from tests.conftest import REPO, compose, write_jsonl

NAMES = ["negative", "positive"]
TEMPLATE = "{text}\nThe sentiment is {y}."


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(len(WORDS), size=6)) for _ in range(n)]


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def reviews(tmp_path: Path, n: int = 24, labels: bool = False, name: str = "reviews.csv") -> Path:
    """A CSV of ``n`` short reviews (id, text[, label]); the same texts with or without labels."""
    texts = sentences(n)
    if labels:
        return write_csv(tmp_path / name, ["id", "text", "label"],
                         [[i, t, NAMES[i % 2]] for i, t in enumerate(texts)])
    return write_csv(tmp_path / name, ["id", "text"], [[i, t] for i, t in enumerate(texts)])


def local_config(model_dir, path, out_dir, *extra, script="unsupervised_icl_llm"):
    """The config of a small run over the file ``path``; ``extra`` overrides win over the defaults here."""
    run_keys = (["N=2", "T=2", "num_repeats=2", "forward_batch_size=8"] if script == "unsupervised_icl_llm" else
                ["batch_size=2", "N=4", "num_iterations=4", "eval_freq=2", "ckpt_freq=2", "lora.r=4"])
    overrides = {o.split("=", 1)[0]: o for o in [
        f"model.pretrained={model_dir}", "model.embedded=null", "model.name=tiny_llama", "dataset=local",
        f"dataset.path={path}", f"labelset.names=[{','.join(NAMES)}]", f"template.text='{TEMPLATE}'",
        "device=cpu", "progress=false", f"output_dir={out_dir}", *run_keys, *extra]}
    return compose(script, list(overrides.values()))


def run_icl(cfg):
    from joint_inference.runs.root import run_icl as run

    return run(cfg)


def read_predictions(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------------- predict-only
def test_predict_only_run_writes_every_rounds_labels_and_no_accuracy(tiny_llama_dir, tmp_path, monkeypatch):
    from joint_inference.scoring import scorer as scoring

    scored_tokens = []
    assemble = scoring.assemble_prompts

    def counting(*args, **kw):
        seqs, positions = assemble(*args, **kw)
        scored_tokens.append(sum(map(len, seqs)))
        return seqs, positions

    monkeypatch.setattr(scoring, "assemble_prompts", counting)
    path, out = reviews(tmp_path), tmp_path / "run"
    results = run_icl(local_config(tiny_llama_dir, path, out))

    columns, rows = read_predictions(out)
    assert columns == ["row", "id", "text", "zero_shot_label", "round_1_label", "round_2_label", "final_label",
                       "vote_margin"]
    assert [r["row"] for r in rows] == [str(i) for i in range(24)] and [r["id"] for r in rows] == [str(i) for i in
                                                                                                    range(24)]
    assert [r["text"] for r in rows] == sentences(24)
    state = json.loads((out / "state.json").read_text())["stages"]
    for stage in ("zero_shot", "round_1", "round_2"):
        assert [NAMES.index(r[f"{stage}_label"]) for r in rows] == state[f"{stage}/test"]["test"]
    assert [r["final_label"] for r in rows] == [r["round_2_label"] for r in rows]
    votes = state["round_2/test"]["test_votes"]
    for r, v in zip(rows, votes):  # the share of the final round's votes that went to the final label
        assert float(r["vote_margin"]) == pytest.approx(np.mean([NAMES[x] == r["final_label"] for x in v]), abs=1e-4)
    jsonl = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [list(j) for j in jsonl] == [columns] * 24 and [j["final_label"] for j in jsonl] == [r["final_label"]
                                                                                                for r in rows]

    # no accuracy anywhere (not 0, not against stand-in labels); the baseline skipped; the diagnostics instead
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert "accuracy" not in json.dumps({k: v for k, v in saved.items() if k != "notes"})
    assert saved["supervised_icl"] is None and any("skipped" in note for note in saved["notes"])
    assert [set(r) for r in saved["rounds"]] == [{"round", "diagnostics"}] * 2
    assert saved["final"]["class_distribution"] == pytest.approx(
        [np.mean([r["final_label"] == n for r in rows]) for n in NAMES])
    table = (out / "results.md").read_text()
    assert "no accuracy" in table and "Label-free diagnostics" in table and "test accuracy" not in table
    assert (out / "rounds.png").stat().st_size > 0
    assert saved["timing"]["prompts_scored"] == 24 + 2 * 24 * 2

    # the dry run's expected tokens are close to what the scorer ran (demonstrations drawn at random)
    plan = run_icl(local_config(tiny_llama_dir, path, tmp_path / "dry", "dry_run=true"))["dry_run"]
    assert plan["total"]["prompts"] == saved["timing"]["prompts_scored"]
    assert abs(plan["total"]["tokens"] - sum(scored_tokens)) < 0.05 * sum(scored_tokens)
    assert nothing_written(tmp_path / "dry")


def test_a_label_column_gives_accuracies_and_the_same_labels(tiny_llama_dir, tmp_path):
    """The labels are read for scoring only: the same texts give the same labels with and without them."""
    run_icl(local_config(tiny_llama_dir, reviews(tmp_path / "a"), tmp_path / "unlabelled"))
    results = run_icl(local_config(tiny_llama_dir, reviews(tmp_path / "b", labels=True), tmp_path / "labelled",
                                   "dataset.label_field=label"))
    _, unlabelled = read_predictions(tmp_path / "unlabelled")
    columns, labelled = read_predictions(tmp_path / "labelled")
    assert "label" in columns
    assert [r["final_label"] for r in labelled] == [r["final_label"] for r in unlabelled]
    assert [r["zero_shot_label"] for r in labelled] == [r["zero_shot_label"] for r in unlabelled]
    for stage, key in (("zero_shot", "zero_shot_label"), ("round_2", "round_2_label")):
        got = results["zero_shot"] if stage == "zero_shot" else results["rounds"][1]
        assert got["test_accuracy"] == pytest.approx(np.mean([r[key] == r["label"] for r in labelled]))
    assert results["supervised_icl"]["test_accuracy"] is not None
    assert (tmp_path / "labelled" / "results.md").read_text().count("test accuracy") >= 1


def test_several_fields_from_json_lines_and_a_seeded_subset(tiny_llama_dir, tmp_path):
    rows = [{"title": t, "body": b, "extra": i} for i, (t, b) in enumerate(zip(sentences(40, 1), sentences(40, 2)))]
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["dataset.text_fields=[title,body]", "template.text='{title}\n{body}\nIt was {y}.'", "T=1",
                 "dataset.num_examples=12"]
    run_icl(local_config(tiny_llama_dir, path, tmp_path / "a", *overrides))
    run_icl(local_config(tiny_llama_dir, path, tmp_path / "b", *overrides))
    other = run_icl(local_config(tiny_llama_dir, path, tmp_path / "c", *overrides, "dataset.sample_seed=7"))
    (_, a), (_, b), (_, c) = (read_predictions(tmp_path / d) for d in "abc")
    assert len(a) == 12 and a == b and other["num_test"] == 12
    assert [r["row"] for r in a] != [r["row"] for r in c]
    for r in a:  # every kept row is the file's row of that number, all its columns kept
        source = rows[int(r["row"])]
        assert (r["title"], r["body"], r["extra"]) == (source["title"], source["body"], str(source["extra"]))
    assert [int(r["row"]) for r in a] == sorted(int(r["row"]) for r in a)


# ---------------------------------------------------------------------------------------- readers
def test_csv_jsonl_json_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from joint_inference.data.files import read_table

    rows = [{"text": "a, quoted\nline", "n": "1"}, {"text": 'say "hi"', "n": "2"}]
    write_csv(tmp_path / "t.csv", ["text", "n"], [[r["text"], r["n"]] for r in rows])
    (tmp_path / "t.tsv").write_text("text\tn\nplain\t3\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for suffix in ("csv", "jsonl", "json", "parquet"):
        got, columns, where = read_table(tmp_path / f"t.{suffix}")
        assert got == rows and columns == ["text", "n"] and len(where) == 2, suffix
    assert read_table(tmp_path / "t.tsv")[0] == [{"text": "plain", "n": "3"}]
    assert read_table(tmp_path / "t.csv")[2] == ["line 2", "line 4"]  # the first row spans two lines


def test_parquet_file_runs_end_to_end(tiny_llama_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": t, "stars": i % 5} for i, t in enumerate(sentences(16))]), path)
    results = run_icl(local_config(tiny_llama_dir, path, tmp_path / "run", "T=1"))
    columns, rows = read_predictions(tmp_path / "run")
    assert len(rows) == 16 and columns[:3] == ["row", "text", "stars"] and results["num_test"] == 16


# -------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def lowercasing_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer lower-cases its input: "Good" and "good" are the same tokens."""
    from tokenizers import normalizers

    from joint_inference.models.tiny import tiny_causal_lm

    directory = tmp_path_factory.mktemp("lowercasing")
    model, tokenizer = tiny_causal_lm("llama")
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (overrides, message fragment)}; the files are written here."""
    good = reviews(tmp_path)
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "reviews.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "fake.parquet").write_text("text\nhello\n")
    (tmp_path / "cut.jsonl").write_text('{"text": "fine"}\n{"text": "cut sho\n')
    write_csv(tmp_path / "empty_rows.csv", ["text"], [["good film"], [""], ["bad film"], ["   "]])
    write_csv(tmp_path / "ragged.csv", ["text", "id"], [["a", 1], ["b, c", 2, 3]])
    write_csv(tmp_path / "three.csv", ["text"], [["a film"], ["the film"], ["this film"]])
    write_csv(tmp_path / "bad_labels.csv", ["text", "label"], [["a film", "positive"], ["the film", "great"]])
    write_jsonl(tmp_path / "typed.jsonl", [{"text": "a film"}, {"text": ["a", "list"]}, {"text": 5}, {"text": "fine"}])
    # a cell longer than the csv module's own limit (128 KiB), and longer than the model's context
    write_csv(tmp_path / "long.csv", ["text"], [["a good film"], ["the film " * 20000], ["a bad film"]])
    return {
        "missing file": ([f"dataset.path={tmp_path / 'nope.csv'}"], "no such file"),
        "no path": (["dataset.path=null"], "set dataset.path="),
        "not UTF-8": ([f"dataset.path={tmp_path / 'binary.csv'}"], "not UTF-8"),
        "unknown format": ([f"dataset.path={tmp_path / 'reviews.xlsx'}"], "cannot tell the format"),
        "not parquet": ([f"dataset.path={tmp_path / 'fake.parquet'}"], "as Parquet"),
        "JSON line cut short": ([f"dataset.path={tmp_path / 'cut.jsonl'}"], "line 2 is not JSON"),
        "ragged CSV": ([f"dataset.path={tmp_path / 'ragged.csv'}"], "line 3 has 3 fields"),
        "template field": ([f"dataset.path={good}", "template.text='{review}\nIt was {y}.'"],
                           "template.text names ['review']"),
        "text field": ([f"dataset.path={good}", "dataset.text_fields=[body]"], "dataset.text_fields names ['body']"),
        "label field": ([f"dataset.path={good}", "dataset.label_field=stars"], "dataset.label_field names ['stars']"),
        "label read by the prompt": ([f"dataset.path={good}", "dataset.label_field=text"], "never read the labels"),
        "empty rows": ([f"dataset.path={tmp_path / 'empty_rows.csv'}"],
                       "2 row(s) have an empty input (text): line 3, line 5"),
        "unknown label": ([f"dataset.path={tmp_path / 'bad_labels.csv'}", "dataset.label_field=label"],
                          "has label 'great'"),
        "more classes than examples": ([f"dataset.path={tmp_path / 'three.csv'}", "labelset.names=[a,b,c,d]"],
                                       "3 example(s) to label but 4 classes"),
        "no label names": ([f"dataset.path={good}", "labelset.names=null"], "set labelset.names="),
        "no template": ([f"dataset.path={good}", "template.text=null"], "needs a prompt"),
        "duplicate label names": ([f"dataset.path={good}", "labelset.names=[good,good]"], "duplicate names"),
        "values that are not text": ([f"dataset.path={tmp_path / 'typed.jsonl'}"],
                                     "2 row(s) cannot be scored: line 2 (its field 'text' is list ['a', 'list'], "
                                     "not text), line 3 (its field 'text' is int 5, not text)"),
        "a row longer than the context": ([f"dataset.path={tmp_path / 'long.csv'}"],
                                         "1 row(s) cannot be scored: line 3 (alone it is "),
        "a formatted field": ([f"dataset.path={good}", "template.text='{text:.20}\nIt was {y}.'"],
                              "formats a field ({text:.20}): a field is written as the row has it, so write {text}"),
    }


@pytest.mark.parametrize("case", ["missing file", "no path", "not UTF-8", "unknown format", "not parquet",
                                  "JSON line cut short", "ragged CSV", "template field", "text field", "label field",
                                  "label read by the prompt", "empty rows", "unknown label",
                                  "more classes than examples", "no label names", "no template",
                                  "duplicate label names", "values that are not text", "a row longer than the context",
                                  "a formatted field"])
def test_bad_input_names_the_problem_and_writes_nothing(tiny_llama_dir, tmp_path, case):
    overrides, message = bad_inputs(tmp_path / "files")[case]
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_icl(local_config(tiny_llama_dir, "unset", out, *overrides))
    assert message in str(err.value)
    assert nothing_written(out)


def test_labels_the_tokenizer_cannot_tell_apart(lowercasing_model_dir, tmp_path):
    out = tmp_path / "run"
    for extra in ([], ["dry_run=true"]):
        with pytest.raises(ConfigError, match=r"\[\['Good', 'good'\]\] tokenize identically"):
            run_icl(local_config(lowercasing_model_dir, reviews(tmp_path), out, "labelset.names=[Good,good]", *extra))
        assert nothing_written(out)


def test_empty_rows_can_be_left_out(tiny_llama_dir, tmp_path):
    texts = sentences(10)
    path = write_csv(tmp_path / "gaps.csv", ["text"], [[t] for t in texts[:4]] + [[""]] + [[t] for t in texts[4:]])
    results = run_icl(local_config(tiny_llama_dir, path, tmp_path / "run", "dataset.on_bad_row=skip", "T=1"))
    _, rows = read_predictions(tmp_path / "run")
    assert results["num_test"] == 10 and [r["row"] for r in rows] == ["0", "1", "2", "3", "5", "6", "7", "8", "9",
                                                                     "10"]


def test_command_line_error_exits_2_and_the_typed_template_needs_no_hydra_quotes(tiny_llama_dir, tmp_path):
    """The README's command as the shell passes it on (its double quotes gone): braces reach Hydra quoted."""
    base = [sys.executable, str(REPO / "unsupervised_icl_llm.py"), f"model.pretrained={tiny_llama_dir}",
            "model.embedded=null", "model.name=tiny_llama", "dataset=local", "labelset.names=[negative,positive]",
            "template.text={text}\\nThe sentiment is {y}.", "device=cpu", "N=2", "T=1", "num_repeats=2"]
    bad = subprocess.run([*base, f"dataset.path={tmp_path / 'nope.csv'}", f"hydra.run.dir={tmp_path / 'bad'}"],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: dataset.path=")
    assert not (tmp_path / "bad" / "results.json").exists()
    dry = subprocess.run([*base, f"dataset.path={reviews(tmp_path)}", "dry_run=true",
                          f"hydra.run.dir={tmp_path / 'dry'}"],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "round 1" in dry.stdout and "no estimate of the wall time" in dry.stdout
    written = {p.name for p in (tmp_path / "dry").iterdir()}
    assert not written & {"results.json", "results.md", "state.json", "predictions.csv", "rounds.png"}


def test_quote_typed_templates():
    from joint_inference.runs.cli import quote_typed_templates

    assert quote_typed_templates(["N=2", "template.text={text}\\nIt's {y}."]) == [
        "N=2", "template.text='{text}\\nIt\\'s {y}.'"]
    assert quote_typed_templates(["template.text='{a} {y}'", 'template.text="{a} {y}"']) == [
        "template.text='{a} {y}'", 'template.text="{a} {y}"']


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_counts_equal_a_direct_count_and_write_nothing(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    path = reviews(tmp_path, n=20, labels=True)
    texts = sentences(20)
    out = tmp_path / "run"
    plan = run_icl(local_config(tiny_llama_dir, path, out, "dataset.label_field=label", "N=4", "num_repeats=3",
                                "dry_run=true"))["dry_run"]
    assert nothing_written(out)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    zero_shot = [len(tokenizer(f"{t}\nThe sentiment is").input_ids) for t in texts]  # BOS + the text before {y}
    demonstration = np.mean([len(tokenizer(f"{t}\nThe sentiment is {name}.\n", add_special_tokens=False).input_ids)
                             for t in texts for name in NAMES])  # text, label, text after it, separator
    icl_tokens = round(3 * sum(4 * demonstration + z for z in zero_shot))  # 3 votes of 4 demonstrations + the query
    assert plan["stages"] == [
        {"stage": "zero-shot", "prompts": 20, "tokens": sum(zero_shot)},
        {"stage": "supervised ICL (baseline)", "prompts": 60, "tokens": icl_tokens},
        {"stage": "round 1", "prompts": 60, "tokens": icl_tokens},
        {"stage": "round 2", "prompts": 60, "tokens": icl_tokens}]
    assert plan["total"] == {"stage": "total", "prompts": 200, "tokens": sum(zero_shot) + 3 * icl_tokens}
    assert plan["estimate_seconds"] is None  # no benchmark of this model

    shared = run_icl(local_config(tiny_llama_dir, path, out, "dataset.label_field=label", "N=4", "num_repeats=3",
                                  "dry_run=true", "support_sampling=shared", "block_size=8"))["dry_run"]
    blocks = 3  # 20 queries in blocks of 8: each block's demonstrations run once per vote
    bos = 1
    assert shared["stages"][2]["tokens"] == round(3 * (blocks * (bos + 4 * demonstration) + sum(zero_shot) - 20 * bos))


def test_estimate_uses_the_benchmark_nearest_in_n(tmp_path):
    from joint_inference.runs.planning import throughput

    got = throughput("gemma3_270m", "cpu", "float32", 8)
    figures = json.loads((REPO / "benchmarks" / "cpu_gemma3_270m_N8.json").read_text())
    assert got["tokens_per_s"] == pytest.approx(figures["num_tokens"] / figures["batched_seconds"])
    assert throughput("gemma3_270m", "cpu", "float32", 14)["benchmark"].endswith("N16.json")
    assert throughput("gemma3_270m", "cuda", "bfloat16", 8) is None and throughput("gpt2", "cpu", "float32", 8) is None


def test_the_estimates_read_the_benchmark_of_the_dtype_the_run_computes_in(tmp_path):
    """bf16 runs are estimated from bf16 figures, fp32 runs from fp32 ones (a benchmark that records no dtype
    measured fp32); with no figure of the dtype, any other is better than none."""
    from joint_inference.runs.planning import step_seconds, throughput

    machine = {"cpu_count": 2}
    (tmp_path / "a_fp32.json").write_text(json.dumps({"model": "m", "device": "cpu", "B": 4, "N": 8,
                                                      "seconds_per_step": 10.0, "machine": machine}))
    (tmp_path / "b_bf16.json").write_text(json.dumps({"model": "m", "device": "cpu", "dtype": "bfloat16", "B": 4,
                                                      "N": 8, "seconds_per_step": 3.0, "machine": machine}))
    (tmp_path / "c_scoring.json").write_text(json.dumps({
        "model": "m", "device": "cpu", "N": 8, "num_tokens": 1000, "batched_seconds": 4.0, "machine": machine,
        "naive_vs_lower_precision": {"bfloat16": {"batched_seconds": 1.0}}}))
    assert step_seconds("m", "cpu", "bfloat16", tmp_path)["seconds_per_step"] == 3.0
    assert step_seconds("m", "cpu", "float32", tmp_path)["seconds_per_step"] == 10.0
    (tmp_path / "a_fp32.json").unlink()
    assert step_seconds("m", "cpu", "float32", tmp_path)["dtype"] == "bfloat16"  # the only figure there is
    assert throughput("m", "cpu", "bfloat16", 8, tmp_path)["tokens_per_s"] == 1000.0
    assert throughput("m", "cpu", "float32", 8, tmp_path)["tokens_per_s"] == 250.0


def test_a_long_cpu_run_stops_with_the_estimate_unless_allowed(tiny_llama_dir, tmp_path, monkeypatch):
    from joint_inference.runs import planning as dry_run

    slow = {"tokens_per_s": 1.0, "benchmark": "benchmarks/slow.json", "N": 2, "dtype": "float32", "cpu_count": 2,
            "gpu": None}
    monkeypatch.setattr(dry_run, "model_throughput", lambda cfg, device: slow)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_icl(local_config(tiny_llama_dir, reviews(tmp_path), out))
    message = str(err.value)
    assert "would take about" in message and "+experiment=quickstart" in message
    assert "allow_long_cpu_run=true" in message
    assert nothing_written(out)
    results = run_icl(local_config(tiny_llama_dir, reviews(tmp_path), out, "allow_long_cpu_run=true", "T=1"))
    assert len(results["rounds"]) == 1


# ------------------------------------------------------------------------------------- fine-tuning
def test_finetuning_without_labels_writes_the_pools_labels(tiny_llama_dir, tmp_path):
    from joint_inference.runs.root import run_finetuning

    out = tmp_path / "run"
    results = run_finetuning(local_config(tiny_llama_dir, reviews(tmp_path), out, script="unsupervised_ft_llm"))
    assert results["zero_shot"]["test_accuracy"] is None and results["final"]["test_accuracy"] is None
    assert results["labelled"] is False
    history = results["history"]
    assert [h["step"] for h in history] == [0, 2, 4] and all(h["test_accuracy"] is None for h in history)
    assert all(len(h["class_distribution"]) == 2 and sum(h["class_distribution"]) == pytest.approx(1) for h in history)
    assert all(h["flip_rate"] is not None for h in history[1:])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("class_distribution") for m in metrics] == [None, history[1]["class_distribution"], None,
                                                              history[2]["class_distribution"]]
    assert all(m["batch_accuracy"] is None for m in metrics)
    columns, rows = read_predictions(out)
    assert columns == ["row", "id", "text", "zero_shot_label", "final_label", "final_probability"] and len(rows) == 24
    assert results["final"]["class_distribution"] == pytest.approx(
        [np.mean([r["final_label"] == n for r in rows]) for n in NAMES])
    assert history[-1]["class_distribution"] == results["final"]["class_distribution"]
    assert all(0.5 <= float(r["final_probability"]) <= 1 for r in rows)
    table = (out / "results.md").read_text()
    assert "no accuracy" in table and "test accuracy" not in table and (out / "learning_curve.png").exists()


def test_finetuning_dry_run(tiny_llama_dir, tmp_path):
    from joint_inference.runs.root import run_finetuning

    out = tmp_path / "run"
    plan = run_finetuning(local_config(tiny_llama_dir, reviews(tmp_path), out, "dry_run=true",
                                       script="unsupervised_ft_llm"))["dry_run"]
    assert plan["stages"][0]["prompts"] == 3 * 24  # step 0, 2 and 4 evaluate the 24 rows
    assert plan["stages"][1]["prompts"] == 4 * (2 * 4 + 2 * 2)
    assert nothing_written(out)


@pytest.mark.integration
def test_quickstart_dry_run_estimate(tmp_path):
    """The quickstart's estimate against its measured wall time (README: about 10 minutes)."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "sst2").exists():
        pytest.skip("no ../shared/data")
    cfg = compose("unsupervised_icl_llm", ["+experiment=quickstart", "dry_run=true", f"dataset.data_root={SHARED_DATA}",
                                           f"output_dir={tmp_path / 'run'}"])
    plan = run_icl(cfg)["dry_run"]
    # 2,400 prompts of zero-shot, supervised ICL and two rounds, and the random-label control's 300 (100 test x 3 votes)
    assert plan["total"]["prompts"] == 2700 and 6 * 60 < plan["estimate_seconds"] < 15 * 60


def test_image_file_runs_through_the_vlm_script(tmp_path):
    """dataset.image_field: a column of image paths, relative to the file's folder."""
    from PIL import Image

    from joint_inference.runs.root import run_icl as run_classification

    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pics" / f"{i}.png")
    path = write_csv(tmp_path / "photos.csv", ["file", "caption"], [[f"pics/{i}.png", f"photo {i}"] for i in range(12)])
    out = tmp_path / "run"
    results = run_classification(compose("unsupervised_icl_vlm", [
        "model=tiny_random_vlm", "dataset=local", f"dataset.path={path}", "dataset.image_field=file",
        "labelset.names=[cat,dog]", "template.text='<image>An image of {y}.<|endofchunk|>'", "N=2", "T=1",
        "num_repeats=2", "device=cpu", "progress=false", f"output_dir={out}"]))
    columns, rows = read_predictions(out)
    assert columns == ["row", "file", "caption", "zero_shot_label", "round_1_label", "final_label", "vote_margin"]
    assert [r["file"] for r in rows] == [f"pics/{i}.png" for i in range(12)] and results["supervised_icl"] is None
    (tmp_path / "pics" / "3.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot decode the image of line 5 of photos.csv"):
        run_classification(compose("unsupervised_icl_vlm", [
            "model=tiny_random_vlm", "dataset=local", f"dataset.path={path}", "dataset.image_field=file",
            "labelset.names=[cat,dog]", "template.text='<image>An image of {y}.<|endofchunk|>'",
            f"output_dir={tmp_path / 'bad'}"]))
    assert nothing_written(tmp_path / "bad")


def test_own_images_split_into_pool_and_test_keep_their_last_pool_labels_under_the_original_protocol(tmp_path):
    """protocol=original leaves a data set's pool unlabelled after the last round, as the original's vision script;
    your own file's pool is labelled to the end (its predictions are what the run is for)."""
    from PIL import Image

    from joint_inference.runs.root import run_icl as run_classification

    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    for i in range(18):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "pics" / f"{i}.png")
    path = write_csv(tmp_path / "photos.csv", ["file", "label"], [[f"pics/{i}.png", ["cat", "dog"][i % 2]]
                                                                 for i in range(18)])
    out = tmp_path / "run"
    results = run_classification(compose("unsupervised_icl_vlm", [
        "model=tiny_random_vlm", "dataset=local", f"dataset.path={path}", "dataset.image_field=file",
        "dataset.label_field=label", "dataset.transductive=false", "labelset.names=[cat,dog]",
        "template.text='<image>An image of {y}.<|endofchunk|>'", "protocol=original", "N=2", "T=2", "num_repeats=2",
        "device=cpu", "progress=false", f"output_dir={out}"]))
    assert all("train_accuracy" in r and r["diagnostics"] for r in results["rounds"])
    columns, rows = read_predictions(out)
    assert "round_2_label" in columns and len(rows) == 18
    assert all(r["round_2_label"] in ("cat", "dog") for r in rows)
