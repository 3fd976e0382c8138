"""Task data: the §7 protocol sample, local files in the hub's schema, the hub path offline,
and (when ../shared/data is present) the real files with the real configs."""
from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from joint_inference.core.errors import ConfigError
from joint_inference.data.hub import load_rows, load_task, protocol_sample
from joint_inference.prompts.templates import Template
from joint_inference.runs.config import config_option
from tests.conftest import SHARED_DATA, compose


def write(path, rows):
    """Rows to ``path`` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        raise ValueError(path)
    return path


def dataset_cfg(root, name="sst2", **kw):
    """A text classification dataset config: the base every such dataset extends, with these values."""
    values = dict(name=name, hub_id=f"test/{name}", source_splits=["train"], num_classes=2,
                  data_root=None if root is None else str(root))
    return OmegaConf.merge(config_option("dataset", "_text_classification"), {**values, **kw})


def sst2_rows(n, start=0):
    return [{"idx": i, "sentence": f"sentence number {i}", "label": i % 2} for i in range(start, start + n)]


# ---------------------------------------------------------------- protocol_sample

def check_split(labels, train, test):
    assert len(np.intersect1d(train, test)) == 0
    assert len(np.unique(train)) == len(train) and len(np.unique(test)) == len(test)
    assert train.min() >= 0 and max(train.max(), test.max()) < len(labels)


def test_protocol_sample_counts_per_class():
    labels = np.repeat([0, 1], [700, 500])
    np.random.default_rng(0).shuffle(labels)
    train, test = protocol_sample(labels, num_classes=2, num_examples=300, seed=42)
    check_split(labels, train, test)
    # 300 // 2 = 150 per class, 2/3 (100) to the pool and 1/3 (50) to the test set
    assert np.bincount(labels[train], minlength=2).tolist() == [100, 100]
    assert np.bincount(labels[test], minlength=2).tolist() == [50, 50]


def test_protocol_sample_caps_at_available_rows():
    labels = np.arange(90) % 3  # 90 rows < 3000: 30 per class -> 20 + 10
    train, test = protocol_sample(labels, num_classes=3, num_examples=3000, seed=1)
    check_split(labels, train, test)
    assert np.bincount(labels[train]).tolist() == [20, 20, 20]
    assert np.bincount(labels[test]).tolist() == [10, 10, 10]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(90))


def test_protocol_sample_without_a_size_takes_every_class_up_to_the_smallest_share():
    labels = np.arange(90) % 3
    train, test = protocol_sample(labels, num_classes=3, num_examples=None, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(90))
    assert np.bincount(labels[train]).tolist() == [20, 20, 20]


def test_protocol_sample_is_seeded():
    labels = np.arange(2000) % 4
    a = protocol_sample(labels, 4, 600, seed=42)
    b = protocol_sample(labels, 4, 600, seed=42)
    c = protocol_sample(labels, 4, 600, seed=43)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert set(a[0].tolist()) != set(c[0].tolist())  # different examples, not just a different order


def test_protocol_sample_small_class_gives_all_its_rows():
    labels = np.concatenate([np.zeros(1000, int), np.ones(30, int)])
    train, test = protocol_sample(labels, num_classes=2, num_examples=300, seed=42)
    check_split(labels, train, test)
    assert np.bincount(labels[train]).tolist() == [100, 20]
    assert np.bincount(labels[test]).tolist() == [50, 10]
    assert set(np.flatnonzero(labels == 1).tolist()) == set(train.tolist() + test.tolist()) - set(range(1000))


def original_release_sample(labels: np.ndarray, num_examples: int, seed: int = 42) -> tuple[list[int], list[int]]:
    """The original release's get_dataset, run with pandas as it is written: each class's rows sampled with
    ``DataFrame.sample(random_state=seed)``, concatenated, then the first 2/3 of each class to train."""
    frame = pd.DataFrame({"label": labels, "row": np.arange(len(labels))})
    counts = frame["label"].value_counts().sort_index()
    per_class = min(num_examples, len(frame)) // len(counts)
    sampled = pd.concat([frame[frame["label"] == c].sample(min(n, per_class), random_state=seed)
                         for c, n in counts.items()]).reset_index(drop=True)
    counts = sampled["label"].value_counts().sort_index()
    train = pd.concat([sampled[sampled["label"] == c].iloc[:int(n * 2 / 3)] for c, n in counts.items()])
    test = pd.concat([sampled[sampled["label"] == c].iloc[int(n * 2 / 3):] for c, n in counts.items()])
    return train["row"].tolist(), test["row"].tolist()


@pytest.mark.parametrize("num_examples", [300, 3000])
def test_protocol_sample_original_draws_the_rows_pandas_draws(num_examples):
    labels = np.repeat([0, 1, 2], [900, 40, 700])  # class 1 is short of its quota at 3000
    np.random.default_rng(0).shuffle(labels)
    train, test = protocol_sample(labels, 3, num_examples, seed=42, sampler="original")
    want_train, want_test = original_release_sample(labels, num_examples)
    assert sorted(train.tolist()) == sorted(want_train) and sorted(test.tolist()) == sorted(want_test)
    stream = protocol_sample(labels, 3, num_examples, seed=42)
    assert sorted(stream[1].tolist()) != sorted(want_test)  # the default draws other rows (same counts)


def test_protocol_sample_needs_two_per_class():
    with pytest.raises(ConfigError):
        protocol_sample(np.array([0, 1, 2, 0, 1]), num_classes=3, num_examples=3000)
    with pytest.raises(ConfigError):
        protocol_sample(np.arange(100) % 2, num_classes=2, num_examples=3)


# ---------------------------------------------------------------- local files

@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_load_task_from_each_local_format(tmp_path, suffix):
    rows = sst2_rows(60)
    write(tmp_path / "sst2" / f"train{suffix}", rows)
    cfg = dataset_cfg(tmp_path, num_examples=30)
    got, labels = load_rows(cfg)
    assert got == rows
    assert labels.tolist() == [r["label"] for r in rows]

    task = load_task(cfg)  # 30 // 2 = 15 per class -> 10 pool + 5 test
    assert len(task.train) == 20 and len(task.test) == 10
    assert np.bincount(task.train_labels).tolist() == [10, 10] and np.bincount(task.test_labels).tolist() == [5, 5]
    for part, part_labels in ((task.train, task.train_labels), (task.test, task.test_labels)):
        assert [r["label"] for r in part] == part_labels.tolist()  # labels stay aligned with their rows
    assert not {r["idx"] for r in task.train} & {r["idx"] for r in task.test}
    again = load_task(cfg)
    assert [r["idx"] for r in again.train] == [r["idx"] for r in task.train]
    other = load_task(dataset_cfg(tmp_path, num_examples=30, sample_seed=7))
    assert {r["idx"] for r in other.train} != {r["idx"] for r in task.train}


def test_source_splits_are_concatenated_in_order(tmp_path):
    write(tmp_path / "rte" / "train.jsonl",
          [{"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i, "label": i % 2} for i in range(10)])
    write(tmp_path / "rte" / "validation.parquet",
          [{"premise": f"v{i}", "hypothesis": f"w{i}", "idx": i, "label": 1} for i in range(6)])
    rows, labels = load_rows(dataset_cfg(tmp_path, "rte", source_splits=["train", "validation"]))
    assert [r["premise"] for r in rows] == [f"p{i}" for i in range(10)] + [f"v{i}" for i in range(6)]
    assert labels.tolist() == [i % 2 for i in range(10)] + [1] * 6


def test_the_dataset_name_picks_the_folder(tmp_path):
    write(tmp_path / "my_sst" / "train.jsonl", sst2_rows(8))
    rows, _ = load_rows(dataset_cfg(tmp_path, name="my_sst"))
    assert len(rows) == 8


def test_label_map_bool_answers(tmp_path):
    rows = [{"question": f"q{i}", "answer": i % 3 == 0, "passage": f"p{i}"} for i in range(9)]
    write(tmp_path / "boolq" / "validation.jsonl", rows)
    cfg = dataset_cfg(tmp_path, "boolq", source_splits=["validation"], label_column="answer",
                      label_map={"True": 0, "False": 1})
    got, labels = load_rows(cfg)
    assert labels.tolist() == [0 if r["answer"] else 1 for r in rows]
    assert got[0]["answer"] is True


def test_string_labels_are_cast(tmp_path):
    rows = [{"ctx": f"c{i}", "endings": ["a", "b", "c", "d"], "label": str(i % 4)} for i in range(8)]
    write(tmp_path / "hellaswag" / "train.jsonl", rows)
    _, labels = load_rows(dataset_cfg(tmp_path, "hellaswag", num_classes=4))
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert labels.dtype.kind == "i"


def test_filter_keeps_the_raw_values(tmp_path):
    subjects = ["abstract_algebra", "high_school_biology", "high_school_biology", "anatomy", "high_school_biology"]
    rows = [{"question": f"q{i}", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i, s in enumerate(subjects)]
    write(tmp_path / "mmlu" / "test.jsonl", rows)
    cfg = dataset_cfg(tmp_path, "mmlu", source_splits=["test"], label_column="answer", num_classes=4,
                      filter={"subject": "high_school_biology"})
    got, labels = load_rows(cfg)
    assert [r["question"] for r in got] == ["q1", "q2", "q4"]
    assert {r["subject"] for r in got} == {"high_school_biology"}  # the original's prompt keeps the underscores
    assert labels.tolist() == [1, 2, 0]

    nothing = dataset_cfg(tmp_path, "mmlu", source_splits=["test"], label_column="answer", num_classes=4,
                          filter={"subject": "astronomy"})
    with pytest.raises(ConfigError, match="no rows"):
        load_rows(nothing)


def test_missing_split_names_it_and_lists_files(tmp_path):
    write(tmp_path / "boolq" / "validation.jsonl", [{"question": "q", "answer": True, "passage": "p"}])
    cfg = dataset_cfg(tmp_path, "boolq", label_column="answer", label_map={"True": 0, "False": 1})
    with pytest.raises(ConfigError) as err:
        load_rows(cfg)
    msg = str(err.value)
    assert "'train'" in msg and "validation.jsonl" in msg and "source_splits" in msg

    with pytest.raises(ConfigError, match="nothing"):
        load_rows(dataset_cfg(tmp_path, "absent_task"))


def test_label_outside_classes_names_the_row(tmp_path):
    rows = sst2_rows(5)
    rows[3]["label"] = -1  # an unlabelled GLUE test split
    write(tmp_path / "sst2" / "test.jsonl", rows)
    with pytest.raises(ConfigError, match=r"row 3\b.*-1"):
        load_rows(dataset_cfg(tmp_path, source_splits=["test"]))

    rows[3]["label"] = 2
    write(tmp_path / "sst2" / "train.jsonl", rows)
    with pytest.raises(ConfigError, match=r"row 3\b"):
        load_rows(dataset_cfg(tmp_path))


def test_missing_label_column_is_named(tmp_path):
    write(tmp_path / "trec" / "train.jsonl", [{"text": "What is an atom ?", "coarse_label": 2, "fine_label": 26}])
    with pytest.raises(ConfigError, match="'label'") as err:
        load_rows(dataset_cfg(tmp_path, "trec", num_classes=6))
    assert "coarse_label" in str(err.value)  # the fields it does have


def test_composed_config_reads_the_data_root(tmp_path):
    write(tmp_path / "sst2" / "train.jsonl", sst2_rows(60))
    cfg = compose("unsupervised_icl_llm", ["dataset=sst2", f"dataset.data_root='{tmp_path}'",
                                           "dataset.num_examples=24"])
    task = load_task(cfg.dataset)
    assert (len(task.train), len(task.test)) == (16, 8)


def test_data_root_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert compose("unsupervised_icl_llm", ["dataset=sst2"]).dataset.data_root == str(tmp_path)
    monkeypatch.delenv("DATA_ROOT")
    assert compose("unsupervised_icl_llm", ["dataset=sst2"]).dataset.data_root is None


# ---------------------------------------------------------------- the hub, offline

def test_unknown_hub_id_offline_points_to_data_root(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables at import time, which came earlier in this process.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    cfg = dataset_cfg(None, "nope", hub_id="joint-inference-tests/no-such-dataset")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_rows(cfg)
    assert time.monotonic() - start < 20
    msg = str(err.value)
    assert "DATA_ROOT" in msg and "joint-inference-tests/no-such-dataset" in msg and "nope/train.jsonl" in msg


# ---------------------------------------------------------------- real files (../shared/data)

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "MANIFEST.tsv").exists(), reason="no ../shared/data")


def real(overrides):
    """Compose with the shared data root, load and sample; check the §7 counts and render a few rows."""
    cfg = compose("unsupervised_icl_llm", [f"dataset.data_root='{SHARED_DATA}'", *overrides])
    _, all_labels = load_rows(cfg.dataset)
    task = load_task(cfg.dataset)
    k = cfg.dataset.num_classes
    per_class = min(cfg.dataset.num_examples, len(all_labels)) // k
    taken = np.minimum(np.bincount(all_labels, minlength=k), per_class)
    assert np.bincount(task.train_labels, minlength=k).tolist() == (taken * 2 // 3).tolist()
    assert np.bincount(task.test_labels, minlength=k).tolist() == (taken - taken * 2 // 3).tolist()
    template = Template(cfg.template.text)
    names = list(cfg.labelset.names)
    for row, label in zip(task.train[:3] + task.test[:3], task.train_labels[:3].tolist() + task.test_labels[:3].tolist()):
        prefix, suffix = template.render_parts(row)
        assert template.render(row, names[label]) == prefix + " " + names[label] + suffix
        assert len(prefix) > len(template.text.split("{")[0])  # the row's fields were filled in
    return cfg, task, all_labels


@needs_shared
def test_real_sst2():
    cfg, task, _ = real(["dataset=sst2", "dataset.num_examples=300"])
    assert (len(task.train), len(task.test)) == (200, 100)
    assert np.bincount(task.train_labels).tolist() == [100, 100]
    assert np.bincount(task.test_labels).tolist() == [50, 50]
    assert all(r["label"] == y for r, y in zip(task.test, task.test_labels.tolist()))
    assert not {r["idx"] for r in task.train} & {r["idx"] for r in task.test}
    assert Template(cfg.template.text).render(task.test[0], "positive").endswith(
        "\nThe sentiment of the sentence is positive.")


@needs_shared
@pytest.mark.parametrize("task", ["sst2", "trec", "rte", "subj"])
def test_real_tasks_draw_the_original_releases_rows(task):
    """dataset.sampler=original gives the original's very pool and test set (as multisets of rows: SST-2 repeats
    sentences), not only their class counts."""
    cfg, data, labels = real([f"dataset={task}", "dataset.sampler=original"])
    rows, _ = load_rows(cfg.dataset)
    want_train, want_test = original_release_sample(labels, cfg.dataset.num_examples, cfg.dataset.sample_seed)
    def as_text(chosen):
        return Counter(json.dumps(r, sort_keys=True, default=str) for r in chosen)

    assert as_text(data.train) == as_text(rows[i] for i in want_train)
    assert as_text(data.test) == as_text(rows[i] for i in want_test)


@needs_shared
def test_real_trec():
    cfg, task, _ = real(["dataset=trec"])
    # 5452 rows: 3000 // 6 = 500 per class asked; small classes (ABBR) give all they have.
    counts = np.bincount(np.concatenate([task.train_labels, task.test_labels]), minlength=6)
    assert counts.max() == 500 and 0 < counts[0] < 500
    assert len(task.train) + len(task.test) == counts.sum()


@needs_shared
def test_real_rte_uses_train_and_validation():
    cfg, task, labels = real(["dataset=rte"])
    assert list(cfg.dataset.source_splits) == ["train", "validation"]
    assert len(labels) == 2490 + 277
    assert len(task.train) + len(task.test) > 2700  # 1383 per class asked; nearly all rows used


@needs_shared
def test_real_mmlu_subject():
    """Transductive by default (the subject's 100 test questions are the pool), validation rows for
    the supervised baseline, the subject with underscores; the §7 sample one setting away."""
    cfg = compose("unsupervised_icl_llm", [f"dataset.data_root='{SHARED_DATA}'", "dataset=mmlu",
                                           "dataset.subject=abstract_algebra"])
    task = load_task(cfg.dataset)
    assert task.transductive and len(task.test) == 100 and {r["subject"] for r in task.test} == {"abstract_algebra"}
    assert len(task.supervised_pool) == 11 and {r["subject"] for r in task.supervised_pool} == {"abstract_algebra"}
    text = Template(cfg.template.text).render(task.test[0], "A")
    assert text.startswith("The following are multiple choice questions (with answers) about abstract_algebra.\n")
    assert text.endswith("\nAnswer: A\n") and f"\nD. {task.test[0]['choices'][3]}\n" in text
    _, sampled, labels = real(["dataset=mmlu", "dataset.subject=abstract_algebra", "dataset.transductive=false"])
    assert len(labels) == 100 and not sampled.transductive and sampled.supervised_pool is None


@needs_shared
@pytest.mark.parametrize("overrides, pool, test", [
    (["dataset=boolq", "dataset.source_splits=[validation]"], None, None),
    (["dataset=mnli", "dataset.source_splits=[validation_matched]"], 3 * 666, 3 * 334),
    (["dataset=ag_news", "dataset.source_splits=[test]"], 4 * 500, 4 * 250),
    (["dataset=subj"], 2 * 1000, 2 * 500),
], ids=["boolq", "mnli", "ag_news", "subj"])
def test_real_tasks_load_and_render(overrides, pool, test):
    cfg, task, _ = real(overrides)
    k = cfg.dataset.num_classes
    assert set(task.train_labels.tolist()) == set(range(k)) == set(task.test_labels.tolist())
    if pool is not None:
        assert (len(task.train), len(task.test)) == (pool, test)
    if cfg.dataset.name == "boolq":
        assert all(y == (0 if r["answer"] else 1) for r, y in zip(task.test, task.test_labels.tolist()))
