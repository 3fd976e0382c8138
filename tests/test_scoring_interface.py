"""Every backend's scorer implements :class:`~joint_inference.scoring.scorer.LabelScorer`, the one interface that
zero-shot, ICL and UICL call: each protocol method exists and can be called as the protocol's (the same
parameters, kinds and defaults; more only with defaults), and each data member is set on an instance.
The vLLM scorer is checked without vLLM installed: its module imports vLLM only when an engine is built."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from joint_inference.api.client import ClientSettings
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.scoring.api import APIScorer
from joint_inference.scoring.scorer import LabelScorer, Scorer
from joint_inference.scoring.vllm import VLLMScorer

SCORERS = [Scorer, VLLMScorer, APIScorer]
OPTIONAL = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def protocol_methods(protocol) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(protocol).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def interface_gaps(cls, protocol=LabelScorer) -> list[str]:
    """The methods of ``protocol`` that ``cls`` lacks or that cannot be called on it as the protocol declares."""
    gaps = []
    for name, wanted in protocol_methods(protocol).items():
        method = getattr(cls, name, None)
        if not callable(method):
            gaps.append(f"{cls.__name__} has no {name}")
            continue
        have = inspect.signature(method)
        params, declared = list(have.parameters.values()), list(wanted.parameters.values())
        head, rest = params[:len(declared)], params[len(declared):]
        as_declared = [(p.name, p.kind, p.default) for p in head] == [(p.name, p.kind, p.default) for p in declared]
        if not as_declared or any(p.default is p.empty and p.kind not in OPTIONAL for p in rest):
            gaps.append(f"{cls.__name__}.{name}{have} is not callable as {name}{wanted}")
    return gaps


def test_the_protocol_lists_what_the_callers_call():
    assert set(protocol_methods(LabelScorer)) == {"label_logprobs", "shared_label_logprobs"}
    assert set(LabelScorer.__annotations__) == {"encoder", "mode", "show_progress"}


@pytest.mark.parametrize("cls", SCORERS, ids=lambda cls: cls.__name__)
def test_each_scorer_has_every_protocol_method(cls):
    assert interface_gaps(cls) == []


def test_a_missing_method_or_another_signature_is_caught():
    class NoSharedScores:
        label_logprobs = Scorer.label_logprobs

    class NoReadParameter:
        shared_label_logprobs = Scorer.shared_label_logprobs

        def label_logprobs(self, prompts, labels, desc=None): ...

    class ExtraRequiredParameter(NoReadParameter):
        def label_logprobs(self, prompts, labels, read="query", desc=None, *, batch): ...

    assert interface_gaps(NoSharedScores) == ["NoSharedScores has no shared_label_logprobs"]
    for cls in (NoReadParameter, ExtraRequiredParameter):
        assert [gap.split("(")[0] for gap in interface_gaps(cls)] == [f"{cls.__name__}.label_logprobs"]


def test_each_scorer_instance_has_the_protocol_data_members(tiny_llama):
    """Built without a GPU, vLLM or a server (none is contacted): the engine and the client are stand-ins."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment is {y}."), ["negative", "positive"])
    client = SimpleNamespace(settings=ClientSettings(base_url="http://127.0.0.1:9/v1", model="tiny",
                                                     show_progress=False))
    scorers = [Scorer(model, encoder, "first", show_progress=False),
               VLLMScorer(llm=None, encoder=encoder, label_mode="first", show_progress=False),
               APIScorer(client, encoder, "first")]
    for scorer in scorers:
        assert [name for name in LabelScorer.__annotations__ if not hasattr(scorer, name)] == []
        assert isinstance(scorer, LabelScorer)
        assert (scorer.encoder, scorer.mode, scorer.show_progress) == (encoder, "first", False)
