"""The Hydra configs: every group composes, the defaults are the paper's, the templates render the
hub's rows exactly as docs/protocol.md §7 writes them, and labels map to class ids the way load_rows does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from joint_inference.data.hub import load_rows
from joint_inference.prompts.templates import Template
from joint_inference.runs.config import config_option, options
from tests.conftest import CONFIG_DIR, compose

PRIMARY = "unsupervised_icl_llm"
CONFIGS = Path(CONFIG_DIR)
# Text classification datasets and language models; generation tasks are checked in test_uicl_generation.py,
# image tasks and vision-language models in test_vision.py.
DATASETS = [name for name in options("dataset") if (ds := config_option("dataset", name)).kind == "classification"
            and ds.modality == "text" and "path" not in ds  # dataset=local (the user's file): tests/test_local_data.py
            and "include_path" not in ds]  # dataset=lm_eval (lm-eval's tasks): tests/test_lm_eval.py
MODELS = [name for name in options("model") if "image_features" not in config_option("model", name)]
TABLE1 = ["sst2", "amazon_polarity", "ag_news", "trec", "dbpedia_14", "subj", "rte", "qnli", "mnli", "copa",
          "boolq", "piqa", "hellaswag", "mmlu"]

# docs/protocol.md §7 label sets, in class-id order.
LABEL_SETS = {
    "sst2": ["negative", "positive"],
    "amazon_polarity": ["negative", "positive"],
    "ag_news": ["world", "sports", "business", "technology"],
    "trec": ["description", "entity", "expression", "human", "location", "number"],
    "dbpedia_14": ["company", "educational institution", "artist", "athlete", "office holder",
                   "mean of transportation", "building", "natural place", "village", "animal", "plant", "album",
                   "film", "written work"],
    "subj": ["objective", "subjective"],
    "rte": ["yes", "no"],
    "qnli": ["yes", "no"],
    "mnli": ["yes", "maybe", "no"],
    "copa": ["1", "2"],
    "piqa": ["1", "2"],
    "boolq": ["yes", "no"],
    "hellaswag": ["1", "2", "3", "4"],
    "mmlu": ["A", "B", "C", "D"],
}

# One row per task in the hub's own schema (field names and label types of datasets.load_dataset),
# the class id load_rows must give it, and the docs/protocol.md §7 template filled by hand with names[0].
ENDINGS = ["pulls out a scraper and scrapes the ice off the windshield.",
           "is standing in the snow, talking to the camera.",
           "hands the man a brush and he cleans the car.",
           "sprays the window with a de-icer."]
CHOICES = ["It stores energy.", "It controls what enters the cell.", "It makes proteins.", "It holds DNA."]
SAMPLES = {
    "sst2": (
        {"idx": 7, "sentence": "a gripping , funny film .", "label": 1}, 1,
        "a gripping , funny film .\nThe sentiment of the sentence is negative."),
    "amazon_polarity": (
        {"title": "Great CD", "content": "My lovely Pat has one of the GREAT voices.", "label": 1}, 1,
        "Great CD My lovely Pat has one of the GREAT voices.\nThe sentiment of the sentence is negative."),
    "ag_news": (
        {"text": "Wall St. Bears Claw Back Into the Black (Reuters)", "label": 2}, 2,
        "Wall St. Bears Claw Back Into the Black (Reuters)\nThe topic of the sentence is about world."),
    "trec": (
        {"text": "What is an atom ?", "coarse_label": 2, "fine_label": 26}, 2,
        "What is an atom ?\nThe topic of the sentence is about description."),
    "dbpedia_14": (
        {"title": "E. D. Abbott Ltd", "content": "Abbott of Farnham was a British coachbuilder.", "label": 0}, 0,
        "E. D. Abbott Ltd Abbott of Farnham was a British coachbuilder.\nThe topic of the sentence is about company."),
    "subj": (
        {"text": "the movie begins in the past .", "label": 1, "label_text": "subjective"}, 1,
        "the movie begins in the past .\nThe sentence is objective."),
    "rte": (
        {"premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
         "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "idx": 0, "label": 1}, 1,
        "No Weapons of Mass Destruction Found in Iraq Yet.\n"
        "Question: Does this imply that \"Weapons of Mass Destruction Found in Iraq.\", yes or no?\nAnswer: yes."),
    "qnli": (
        {"question": "When did Beyonce start becoming popular?",
         "sentence": "Beyonce rose to fame in the late 1990s.", "label": 0, "idx": 3}, 0,
        "Beyonce rose to fame in the late 1990s.\nQuestion: Does that sentence have all you need to answer the "
        "question \"When did Beyonce start becoming popular?\", yes or no?\nAnswer: yes."),
    "mnli": (
        {"premise": "The new rights are nice enough", "hypothesis": "Everyone really likes the newest benefits",
         "label": 2, "idx": 0}, 2,
        "The new rights are nice enough\nBased on the previous passage, is it true that "
        "\"Everyone really likes the newest benefits\"?\n yes."),
    "copa": (
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
         "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0}, 0,
        "Consider the following premise: ''' My body cast a shadow over the grass. '''\n"
        "Choice 1: The sun was rising.\nChoice 2: The grass was cut.\n"
        "Q: Which one is more likely to be the cause, choice 1 or choice 2?\nA: choice 1."),
    "boolq": (
        {"question": "do iran and afghanistan speak the same language", "answer": True,
         "passage": "Persian is spoken in Iran and Afghanistan."}, 0,
        "Persian is spoken in Iran and Afghanistan.\n\nQuestion: After reading this passage, the answer to the "
        "question do iran and afghanistan speak the same language is yes or no?\nAnswer: yes."),
    "piqa": (
        {"goal": "Keep bread fresh.", "sol1": "Put it in the freezer.", "sol2": "Put it in the oven.",
         "label": 0}, 0,
        "Goal: Keep bread fresh.\nSolution 1: Put it in the freezer.\nSolution 2: Put it in the oven.\n"
        "Question: Given the goal, what is the correct solution, solution 1 or solution 2?\nAnswer: solution 1."),
    "hellaswag": (
        {"ind": 4, "activity_label": "Removing ice from car",
         "ctx_a": "Then, the man writes over the snow covering the window of a car.", "ctx_b": "a woman",
         "ctx": "Then, the man writes over the snow covering the window of a car. a woman", "endings": ENDINGS,
         "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "train", "split_type": "indomain", "label": "3"}, 3,
        "Consider the following description: ''' Then, the man writes over the snow covering the window of a car. "
        "a woman '''\nChoice 1: pulls out a scraper and scrapes the ice off the windshield.\n"
        "Choice 2: is standing in the snow, talking to the camera.\n"
        "Choice 3: hands the man a brush and he cleans the car.\nChoice 4: sprays the window with a de-icer.\n"
        "Question: Which is the most plausible ending, choice 1, choice 2, choice 3 or choice 4?\nAnswer: choice 1."),
    "mmlu": (
        {"question": "Which of these is a function of the cell membrane?", "subject": "high_school_biology",
         "choices": CHOICES, "answer": 1}, 1,
        "The following are multiple choice questions (with answers) about high_school_biology.\n"
        "Which of these is a function of the cell membrane?\nA. It stores energy.\n"
        "B. It controls what enters the cell.\nC. It makes proteins.\nD. It holds DNA.\nAnswer: A\n"),
}


def quoted(path) -> str:
    """A path as a Hydra override value (tmp paths of parametrised tests hold brackets)."""
    return "'" + str(path) + "'"


def test_the_test_tables_cover_every_dataset_config():
    assert sorted(SAMPLES) == sorted(LABEL_SETS) == sorted(TABLE1) == DATASETS


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_composes_with_its_template_and_labelset(name):
    cfg = compose(PRIMARY, [f"dataset={name}"])
    assert cfg.dataset.name == name
    assert cfg.template == OmegaConf.load(CONFIGS / "template" / f"{name}.yaml")
    assert cfg.labelset == OmegaConf.load(CONFIGS / "labelset" / f"{name}.yaml")
    assert list(cfg.labelset.names) == LABEL_SETS[name]
    assert len(cfg.labelset.names) == cfg.dataset.num_classes
    # The §7 protocol: 3000 examples, seed 42, the train split (RTE and COPA: train + validation).
    assert cfg.dataset.num_examples == 3000 and cfg.dataset.sample_seed == 42
    expected_splits = {"rte": ["train", "validation"], "copa": ["train", "validation"], "mmlu": ["test"]}
    assert list(cfg.dataset.source_splits) == expected_splits.get(name, ["train"])
    assert cfg.dataset.hub_id  # where the hub path would load it from


@pytest.mark.parametrize("name", DATASETS)
def test_template_renders_a_hub_row_as_the_protocol_writes_it(name, tmp_path):
    row, label, expected = SAMPLES[name]
    overrides = [f"dataset={name}", f"dataset.data_root={quoted(tmp_path)}"]
    if name == "mmlu":
        overrides.append("dataset.subject=high_school_biology")
    cfg = compose(PRIMARY, overrides)
    for split in cfg.dataset.source_splits:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{split}.jsonl").write_text(json.dumps(row) + "\n")

    rows, labels = load_rows(cfg.dataset)
    assert len(rows) == len(cfg.dataset.source_splits)
    assert labels.tolist() == [label] * len(rows)
    template = Template(cfg.template.text)
    assert template.label_lead == " "
    assert template.render(rows[0], cfg.labelset.names[0]) == expected
    # Prefix and suffix are exactly what surrounds " <label>": nothing lost or doubled.
    prefix, suffix = template.render_parts(rows[0])
    assert prefix + " " + cfg.labelset.names[-1] + suffix == template.render(rows[0], cfg.labelset.names[-1])


def test_template_and_labelset_stay_overridable():
    cfg = compose(PRIMARY, ["dataset=mmlu", "template=sst2", "labelset=rte"])
    assert cfg.dataset.name == "mmlu"
    assert cfg.template.text == "{sentence}\nThe sentiment of the sentence is {y}."
    assert list(cfg.labelset.names) == ["yes", "no"]


def test_trec_labelsets_original_and_corrected(tmp_path):
    rows = [{"text": "What does NASA stand for ?", "coarse_label": 0, "fine_label": 1},
            {"text": "What is an atom ?", "coarse_label": 2, "fine_label": 26}]
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    original = compose(PRIMARY, ["dataset=trec", f"dataset.data_root={quoted(tmp_path)}"])
    corrected = compose(PRIMARY, ["dataset=trec", "labelset=trec_corrected", f"dataset.data_root={quoted(tmp_path)}"])
    assert corrected.dataset == original.dataset and corrected.template == original.template

    _, labels = load_rows(original.dataset)
    assert labels.tolist() == [0, 2]
    # The original's naming (reproduces the paper): ABBR is called "description", DESC "expression".
    assert [original.labelset.names[i] for i in labels.tolist()] == ["description", "expression"]
    assert [corrected.labelset.names[i] for i in labels.tolist()] == ["abbreviation", "description"]
    assert list(corrected.labelset.names) == ["abbreviation", "entity", "description", "human", "location", "number"]


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes(name):
    cfg = compose(PRIMARY, [f"model={name}"])
    assert cfg.model.name == name
    for key in ("name", "pretrained", "dtype"):
        assert key in cfg.model
    assert isinstance(cfg.model.dtype, str)
    # Where the weights come from: a hub id / directory, or (test models) a random initialisation.
    assert cfg.model.pretrained or cfg.model.get("random_init")


def test_default_command_line_contract():
    cfg = compose(PRIMARY, [])
    assert (cfg.N, cfg.T, cfg.num_repeats, cfg.seed) == (16, 8, 5, 20)
    assert cfg.forward_batch_size == "auto"
    assert cfg.device == "auto"
    assert cfg.dataset.num_examples == 3000
    assert cfg.dataset.name == "sst2"
    for key in ("label_mode", "supervised_icl", "save_predictions", "output_dir"):
        assert key in cfg


def test_overrides_reach_nested_keys():
    cfg = compose(PRIMARY, ["N=4", "dataset=ag_news", "dataset.num_examples=120", "dataset.source_splits=[test]"])
    assert cfg.N == 4 and cfg.dataset.num_examples == 120 and list(cfg.dataset.source_splits) == ["test"]
    assert cfg.template == OmegaConf.load(CONFIGS / "template" / "ag_news.yaml")


def test_quickstart_preset():
    cfg = compose(PRIMARY, ["+experiment=quickstart"])
    assert (cfg.N, cfg.T, cfg.num_repeats) == (8, 2, 3)
    assert cfg.dataset.num_examples == 300
    assert cfg.device == "cpu"
    assert cfg.dataset.name == "sst2" and cfg.model.name == "gemma3_270m"
    assert cfg.template == OmegaConf.load(CONFIGS / "template" / "sst2.yaml")
    # A preset holds deltas only: the dataset group can still be swapped on the command line.
    other = compose(PRIMARY, ["+experiment=quickstart", "dataset=trec"])
    assert other.dataset.name == "trec" and other.dataset.num_examples == 300
    assert list(other.labelset.names) == LABEL_SETS["trec"]


def test_table1_llama_preset():
    cfg = compose(PRIMARY, ["+experiment=table1_llama", "dataset=ag_news"])
    assert cfg.model.name == "llama3.1_8b" and cfg.model.pretrained == "meta-llama/Llama-3.1-8B"
    assert (cfg.N, cfg.T, cfg.num_repeats, cfg.seed) == (16, 8, 5, 20)
    assert (cfg.label_mode, cfg.protocol, cfg.dataset.sampler) == ("first", "original", "original")
    assert cfg.dataset.name == "ag_news" and cfg.dataset.num_examples == 3000
    assert list(cfg.labelset.names) == LABEL_SETS["ag_news"]


def test_table1_uft_llama_preset():
    """The original's text script clips at N (its config's 10 is unused); the base default stays 10."""
    cfg = compose("unsupervised_ft_llm", ["+experiment=table1_uft_llama", "dataset=sst2"])
    assert cfg.model.name == "llama3.1_8b" and cfg.max_norm == cfg.N == 16 and cfg.seed == 42
    assert cfg.dataset.sampler == "original"
    assert (cfg.batch_size, cfg.num_iterations, cfg.gamma, cfg.lora.r, cfg.lora.alpha) == (8, 3000, 10.0, 16, 16)
    assert dict(cfg.optimization) == {"lr": 1e-5, "schedule": "constant", "warmup_steps": 0, "min_lr": 0.0}
    assert compose("unsupervised_ft_llm", ["+experiment=table1_uft_llama", "N=8"]).max_norm == 8
    assert compose("unsupervised_ft_llm", []).max_norm == 10.0


@pytest.mark.parametrize("original,ours", [
    ("llama_sst2.yaml", ("unsupervised_ft_llm", ["+experiment=table1_uft_llama", "dataset=sst2"])),
    ("openflamingo_cifar100_of_lora.yaml",
     ("unsupervised_ft_vlm", ["+experiment=table3_uft_openflamingo", "dataset=cifar100", "task_encoder=lora"])),
])
def test_the_originals_config_names_give_our_presets(original, ours):
    """The original's `--config-name llama_sst2.yaml` commands run the same settings as ours."""
    name, overrides = ours
    assert OmegaConf.to_container(compose(original, [])) == OmegaConf.to_container(compose(name, overrides))
    assert compose(original, ["seed=1", "dataset=ag_news"]).dataset.name == "ag_news"
