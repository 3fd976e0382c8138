"""The scorer against a slow, obviously-correct reference: one prompt per forward pass,
full-vocabulary logits at every position, label tokens picked out by hand."""
from __future__ import annotations

import copy

import pytest
import torch

from joint_inference.core.errors import ConfigError
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.scoring.scorer import Scorer, minimal_prefix_lengths, resolve_label_mode
from tests.conftest import tiny_gemma3

TEMPLATE = Template("{sentence}\nThe sentiment of the sentence is {y}.")
SENTENCES = ["the movie was good", "awful boring plot", "a great story and fun actors", "not very good",
             "i love it", "the acting was quite bad but the plot was really fun and the story good"]
# Multi-token labels (unknown words for the tiny tokenizer): shared first tokens, one a prefix of another.
MULTI = ["zebra crossing", "zebra stripes", "qux", "zebra"]
SINGLE = ["negative", "positive"]


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def original_read_shift(tokenizer, label_names) -> int:
    """Label tokens that the original's marker probe counts as prompt: it renders the template with
    a special marker in place of the label and reads at the end of the common token prefix."""
    marked = copy.deepcopy(tokenizer)
    marked.add_special_tokens({"additional_special_tokens": ["<loc_finder>"]}, replace_extra_special_tokens=False)
    enc = lambda text: marked.encode(text, add_special_tokens=False)  # noqa: E731
    before = "x\nThe sentiment of the sentence is"
    probe = enc(before + " <loc_finder>.")
    return min(lcp(probe, enc(f"{before} {name}.")) - len(enc(before)) for name in label_names)


def reference_logprobs(model, tokenizer, label_names, mode, sentences, demo_labels, read):
    """Slow reference: build each prompt's text piece by piece, run the full model, read by hand
    where the original's probe reads."""
    label_ids = [tokenizer.encode(" " + name, add_special_tokens=False) for name in label_names]
    shift = original_read_shift(tokenizer, label_names)
    assert shift >= 0  # these tokenizers never move prompt tokens into the label
    stem, label_ids = label_ids[0][:shift], [ids[shift:] for ids in label_ids]
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer("a").input_ids[0] == tokenizer.bos_token_id else []
    ids, positions = list(bos), []
    for i, sentence in enumerate(sentences):
        ids += enc(sentence + "\nThe sentiment of the sentence is") + stem
        positions.append(len(ids) - 1)
        if i < len(demo_labels):
            ids += label_ids[demo_labels[i]] + enc(".") + enc("\n")
    if read == "query":
        positions = positions[-1:]

    def logprobs_after(prefix):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prefix])).logits[0, -1].float(), -1)

    out = []
    for p in positions:
        prefix = ids[: p + 1]
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1].float()
        if mode == "first":
            scores = torch.stack([logits[ids_k[0]] for ids_k in label_ids])
        elif mode == "bot":
            scores = torch.stack([logits[ids_k].mean() for ids_k in label_ids])
        elif mode == "bot_minimal":
            # shortest prefix not shared with any other label: 1 + longest common prefix with another
            scores = []
            for k, ids_k in enumerate(label_ids):
                m = min(len(ids_k), 1 + max(lcp(ids_k, o) for j, o in enumerate(label_ids) if j != k))
                scores.append(logits[ids_k[:m]].mean())
            scores = torch.stack(scores)
        else:  # exact: sum of token log-probs, each after the previous label tokens
            scores = torch.stack([
                sum(logprobs_after(prefix + ids_k[:j])[t] for j, t in enumerate(ids_k)) for ids_k in label_ids])
        out.append(torch.log_softmax(scores, -1))
    return torch.stack(out)


def make_prompts(encoder, n_prompts, read):
    """Prompts of different lengths: prompt i has i % 4 + 1 examples."""
    prompts, labels = [], []
    for i in range(n_prompts):
        m = i % 4 + 1
        sentences = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(m)]
        labs = [(i * 7 + j) % encoder.num_labels for j in range(m if read == "all" else m - 1)]
        prompts.append(sentences)
        labels.append(labs)
    return prompts, labels


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("mode,names", [("first", SINGLE), ("bot", MULTI), ("bot_minimal", MULTI),
                                        ("exact", MULTI), ("exact", SINGLE)])
@pytest.mark.parametrize("read", ["query", "all"])
def test_batched_scorer_equals_reference(request, model_name, mode, names, read):
    model, tokenizer = request.getfixturevalue(model_name)
    encoder = PromptEncoder(tokenizer, TEMPLATE, names)
    scorer = Scorer(model, encoder, mode, batch_size=3, show_progress=False)
    sentences, labels = make_prompts(encoder, 7, read)
    if read == "all":  # uniform length per call
        sentences, labels = [s for s in sentences if len(s) == 3], [lab for lab in labels if len(lab) == 3]
    prompts = [[encoder.encode({"sentence": s}) for s in sents] for sents in sentences]
    with torch.no_grad():
        got = scorer.label_logprobs(prompts, labels, read=read)
    for i, (sents, labs) in enumerate(zip(sentences, labels)):
        want = reference_logprobs(model, tokenizer, names, mode, sents, labs, read)
        torch.testing.assert_close(got[i], want[0] if read == "query" else want, atol=1e-4, rtol=1e-4)


def test_softcapped_logits_match_reference():
    """Gemma-style final-logit soft-capping is applied on the label columns too."""
    model, tokenizer = tiny_gemma3()
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    scorer = Scorer(model, encoder, "first", batch_size=2, show_progress=False)
    prompts = [[encoder.encode({"sentence": s}) for s in SENTENCES[:3]], [encoder.encode({"sentence": SENTENCES[5]})]]
    labels = [[0, 1], []]
    with torch.no_grad():
        got = scorer.label_logprobs(prompts, labels)
    for i, sents in enumerate([SENTENCES[:3], [SENTENCES[5]]]):
        want = reference_logprobs(model, tokenizer, SINGLE, "first", sents, labels[i], "query")[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_batch_size_and_order_do_not_change_scores(tiny_llama):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    sentences, labels = make_prompts(encoder, 9, "query")
    prompts = [[encoder.encode({"sentence": s}) for s in sents] for sents in sentences]
    with torch.no_grad():
        one = Scorer(model, encoder, "first", batch_size=1, show_progress=False).label_logprobs(prompts, labels)
        many = Scorer(model, encoder, "first", batch_size=4, show_progress=False).label_logprobs(prompts, labels)
        rev = Scorer(model, encoder, "first", batch_size=4, show_progress=False).label_logprobs(prompts[::-1], labels[::-1])
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many, rev.flip(0), atol=1e-5, rtol=1e-5)


def test_assembled_prompt_is_the_rendered_text(tiny_gpt2):
    """Positions and pieces by brute force: the tokens decode to the joined rendered examples,
    each read position is the last token before the label (after the space token, which this
    tokenizer writes apart from the unknown label words, as the original's probe reads), and the
    query's label is absent."""
    _, tokenizer = tiny_gpt2
    encoder = PromptEncoder(tokenizer, TEMPLATE, MULTI)
    stem = tokenizer.decode(encoder.label_stem)
    assert stem == " "
    examples = [{"sentence": s} for s in SENTENCES[:3]]
    ids, positions = encoder.assemble([encoder.encode(e) for e in examples], [0, 3])
    rendered = [TEMPLATE.render(examples[0], MULTI[0]), TEMPLATE.render(examples[1], MULTI[3])]
    query_prefix = TEMPLATE.render(examples[2], "").rsplit(" ", 1)[0] + stem
    assert tokenizer.decode(ids) == "\n".join(rendered + [query_prefix])
    for pos, example in zip(positions, examples):
        assert tokenizer.decode(ids[: pos + 1]).endswith(example["sentence"] + "\nThe sentiment of the sentence is" + stem)
    for pos, k in zip(positions[:2], [0, 3]):
        label = encoder.label_ids[k]
        assert tuple(ids[pos + 1 : pos + 1 + len(label)]) == label
    assert positions[-1] == len(ids) - 1


def test_minimal_prefix_lengths_brute_force():
    import itertools

    labels = [(1, 2, 3), (1, 2, 4), (1, 5), (6,), (1, 2)]
    got = minimal_prefix_lengths(labels)
    for k, ids in enumerate(labels):
        unique = [m for m in range(1, len(ids) + 1)
                  if all(tuple(o[:m]) != ids[:m] for j, o in enumerate(labels) if j != k)]
        assert got[k] == (min(unique) if unique else len(ids))
    assert got == [3, 3, 2, 1, 2]
    for perm in itertools.permutations(range(len(labels))):  # order of labels does not matter
        assert [minimal_prefix_lengths([labels[i] for i in perm])[perm.index(k)] for k in range(len(labels))] == got


def test_label_mode_resolution_and_errors(tiny_llama):
    _, tokenizer = tiny_llama
    multi = PromptEncoder(tokenizer, TEMPLATE, MULTI)
    single = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    assert resolve_label_mode("auto", single.label_ids, SINGLE) == "first"
    assert resolve_label_mode("auto", multi.label_ids, MULTI) == "exact"
    with pytest.raises(ConfigError, match="share"):
        resolve_label_mode("first", multi.label_ids, MULTI)
    with pytest.raises(ConfigError, match="unknown label_mode"):
        resolve_label_mode("bag", single.label_ids, SINGLE)


def test_prompt_longer_than_context_is_an_error(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    long_example = encoder.encode({"sentence": " ".join(["good"] * 1100)})
    with pytest.raises(ConfigError, match="context"):
        Scorer(model, encoder, "first", show_progress=False).label_logprobs([[long_example]], [[]])


def test_scores_are_differentiable_for_the_task_encoder(tiny_llama):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    scorer = Scorer(model, encoder, "first", show_progress=False)
    weight = scorer.head.weight
    weight.requires_grad_(True)
    try:
        out = scorer.label_logprobs([[encoder.encode({"sentence": "good"})]], [[]])
        out[0, 1].backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_template_errors():
    with pytest.raises(ConfigError, match="exactly once"):
        Template("{sentence} is {y} and {y}")
    with pytest.raises(ConfigError, match="needs field"):
        TEMPLATE.render_parts({"text": "x"})
    assert Template("{premise}\n {y}.").label_lead == " "
    assert Template("Q: {choices[0]} {x}\nAnswer: {y}\n").fields == ["choices", "x"]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2", "tiny_gemma3_window8", "tiny_gemma3_window256"])
@pytest.mark.parametrize("mode,names", [("first", SINGLE), ("bot_minimal", MULTI), ("exact", MULTI)])
@pytest.mark.parametrize("batch_tokens", [None, 40])
def test_shared_demonstrations_equal_separate_prompts(request, monkeypatch, model_name, mode, names, batch_tokens):
    """Encoding the demonstrations once (key/value cache) gives the scores of whole prompts: in padded batches,
    and with a token budget packed several queries to a row, unless a sliding attention window cuts into the
    prompt (then padded; window 8 is shorter than the prompts, 256 longer)."""
    if model_name.startswith("tiny_gemma3"):
        window = int(model_name.removeprefix("tiny_gemma3_window"))
        model, tokenizer = tiny_gemma3(layer_types=["sliding_attention", "full_attention"], sliding_window=window)
    else:
        model, tokenizer = request.getfixturevalue(model_name)
    encoder = PromptEncoder(tokenizer, TEMPLATE, names)
    scorer = Scorer(model, encoder, mode, batch_size=3, show_progress=False, batch_tokens=batch_tokens)
    demos = [encoder.encode({"sentence": s}) for s in SENTENCES[:4]]
    demo_labels = [1, 0, len(names) - 1, 0]
    queries = [encoder.encode({"sentence": s}) for s in SENTENCES + ["fun", "bad movie"]]
    packed_passes = []  # (sequences, rows) of each packed pass

    def packed_hidden(seqs, prefix):
        hidden, starts = Scorer._packed_hidden(scorer, seqs, prefix)
        packed_passes.append((len(seqs), hidden.shape[0] // (2 * max(len(s) for s in seqs))))
        return hidden, starts

    monkeypatch.setattr(scorer, "_packed_hidden", packed_hidden)
    with torch.no_grad():
        shared = scorer.shared_label_logprobs(demos, demo_labels, queries)
        separate = scorer.label_logprobs([[*demos, q] for q in queries], [demo_labels] * len(queries))
    torch.testing.assert_close(shared, separate, atol=1e-4, rtol=1e-4)
    packs = batch_tokens is not None and mode != "exact" and model_name != "tiny_gemma3_window8"
    assert sum(n for n, _ in packed_passes) == (len(queries) if packs else 0)
    if packs:  # some row held more than one query
        assert any(rows < n for n, rows in packed_passes)


def test_out_of_memory_halves_the_batch_and_keeps_scores(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    sentences, labels = make_prompts(encoder, 9, "query")
    prompts = [[encoder.encode({"sentence": s}) for s in sents] for sents in sentences]
    scorer = Scorer(model, encoder, "first", batch_size=8, show_progress=False)
    with torch.no_grad():
        want = scorer.label_logprobs(prompts, labels)
    real_body, sizes = scorer.body, []

    def small_memory(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        return real_body(**kw)

    monkeypatch.setattr(scorer, "body", small_memory)
    with torch.no_grad():
        got = scorer.label_logprobs(prompts, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert scorer.batch_size == 2 and sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2


@pytest.mark.parametrize("read", ["query", "all"])
def test_shared_leading_label_tokens_fold_into_the_prompt(tiny_llama, read):
    """Labels " a 1" / " a 2" / " a 3" share their first tokens (" a", " "): folding them into the
    prefix leaves every token sequence as it was, makes `first` possible, and gives the exact
    scores of the unfolded labels (the shared token's probability cancels)."""
    model, tokenizer = tiny_llama
    names = ["a 1", "a 2", "a 3"]
    plain = PromptEncoder(tokenizer, TEMPLATE, names)
    folded = PromptEncoder(tokenizer, TEMPLATE, names, fold_shared_label_tokens=True)
    assert len({ids[0] for ids in plain.label_ids}) == 1  # the precondition: a shared first token
    extra = len(folded.label_stem) - len(plain.label_stem)  # the shared tokens beyond the probe's stem
    assert extra >= 1 and folded.label_stem == plain.label_stem + plain.label_ids[0][:extra]
    assert all(ids[:extra] == plain.label_ids[0][:extra] for ids in plain.label_ids)
    assert all(len(ids) >= 1 for ids in folded.label_ids)
    assert resolve_label_mode("auto", folded.label_ids, names) == "first"
    sentences = [SENTENCES[:3], SENTENCES[2:5], SENTENCES[3:6]]
    labels = [[0, 2, 1][: 3 if read == "all" else 2]] * 3
    for sents in sentences:
        ids_plain, pos_plain = plain.assemble([plain.encode({"sentence": s}) for s in sents], labels[0])
        ids_folded, pos_folded = folded.assemble([folded.encode({"sentence": s}) for s in sents], labels[0])
        assert ids_folded[: len(ids_plain)] == ids_plain
        assert pos_folded == [p + extra for p in pos_plain]
    scorer = Scorer(model, folded, "auto", batch_size=2, show_progress=False)
    with torch.no_grad():
        got = scorer.label_logprobs([[folded.encode({"sentence": s}) for s in sents] for sents in sentences],
                                    labels, read=read)
    for i, sents in enumerate(sentences):
        want = reference_logprobs(model, tokenizer, names, "exact", sents, labels[i], read)
        torch.testing.assert_close(got[i], want[0] if read == "query" else want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,names", [("first", SINGLE), ("bot", MULTI), ("bot_minimal", MULTI)])
def test_query_hidden_states_through_the_label_weights_are_the_label_scores(tiny_llama, mode, names):
    """What fine-tuning's linear head is built from: the hidden states at the queries, projected onto the label
    columns and mixed by the label weights, give label_logprobs' scores. Exact mode is not linear: no weights."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, names)
    scorer = Scorer(model, encoder, mode, batch_size=3, show_progress=False)
    sentences, labels = make_prompts(encoder, 7, "query")
    prompts = [[encoder.encode({"sentence": s}) for s in sents] for sents in sentences]
    columns, weights = scorer.label_weights
    with torch.no_grad():
        hidden = scorer.query_hidden_states(prompts, labels)
        label_logits = model.get_output_embeddings()(hidden)[:, columns] @ weights.T  # tiny llama: no bias or cap
        want = scorer.label_logprobs(prompts, labels)
    assert hidden.shape == (len(prompts), model.config.hidden_size) and hidden.dtype == torch.float32
    torch.testing.assert_close(torch.log_softmax(label_logits, -1), want, atol=1e-5, rtol=1e-5)
    assert Scorer(model, encoder, "exact", show_progress=False).label_weights is None


@pytest.mark.parametrize("names,own", [(["the", "zebra crossing", "qux stripes"], False),
                                       (["choice 1", "choice 2", "choice 3"], True)])
def test_the_dry_run_counts_the_forward_passes_exact_mode_runs(tiny_llama, monkeypatch, names, own):
    """The plan's passes per prompt (runs/planning.py: forward_passes) are the sequences the exact scorer runs:
    one for the one-token labels together and one per multi-token label, or one per label where every example
    has its own choices (lm-eval tasks)."""
    from joint_inference.prompts.templates import ChoiceEncoder
    from joint_inference.runs.planning import forward_passes

    model, tokenizer = tiny_llama
    if own:
        encoder = ChoiceEncoder(tokenizer, TEMPLATE, names, "endings")
        rows = [{"sentence": f"a b {i}", "endings": ["good", "very bad", "so so so"]} for i in range(5)]
    else:
        encoder = PromptEncoder(tokenizer, TEMPLATE, names)
        rows = [{"sentence": f"a b {i}"} for i in range(5)]
    scorer = Scorer(model, encoder, "exact", batch_size=4, show_progress=False)
    run, sequences = scorer._run, []
    monkeypatch.setattr(scorer, "_run", lambda seqs, *a, **k: sequences.append(len(seqs)) or run(seqs, *a, **k))
    with torch.no_grad():
        scorer.label_logprobs([[e] for e in encoder.encode_all(rows)], [[]] * len(rows))
    assert sum(sequences) == len(rows) * forward_passes(encoder)
    lengths = [len(ids) for ids in encoder.label_ids]
    assert own or (min(lengths) == 1 < max(lengths))  # both terms counted: one-token and multi-token labels
