"""Templates, label sets and their token ids: everything that turns an example into tokens.

An example is rendered as ``prefix + label + suffix`` where the template reads
``"...{y}..."``. The prefix and suffix are tokenized once per example; the label tokens once per
label set. A prompt is then a concatenation of these pieces, so the position where a label is
read is known without ever writing a gold label into a prompt.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..core.errors import ConfigError

LABEL_FIELD = "y"


@dataclass(frozen=True)
class Template:
    """A format string with input fields and exactly one ``{y}`` where the label goes."""

    text: str

    def __post_init__(self):
        """Checked before any data or model loads: a template that cannot be filled, or whose label
        has nothing before it to be read from, would otherwise fail or mislead only once scoring starts."""
        if self.text.count("{" + LABEL_FIELD + "}") != 1:
            raise ConfigError(f"template must contain '{{{LABEL_FIELD}}}' exactly once, got {self.text!r}")
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as err:
            raise ConfigError(f"template {self.text!r} has unbalanced braces ({err}); write a literal brace as "
                              "{{ or }}") from None
        for _, field, spec, conversion in parsed:
            if field is not None and (spec or conversion):
                written = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise ConfigError(f"template {self.text!r} formats a field ({written}): a field is written as the "
                                  f"row has it, so write {{{field}}} (a literal brace is {{{{ or }}}})")
        if not self.text.split("{" + LABEL_FIELD + "}")[0].strip():
            raise ConfigError(f"template {self.text!r} has no text before '{{{LABEL_FIELD}}}': a label is read from "
                              "the text before it, so the example goes first, e.g. '{sentence}\\nIt was {y}.'")

    @property
    def fields(self) -> list[str]:
        """Names of the dataset fields the template reads (``{choices[0]}`` reads ``choices``)."""
        names = []
        for _, field, _, _ in string.Formatter().parse(self.text):
            if field is None:
                continue
            root = field.split("[")[0].split(".")[0]
            if root != LABEL_FIELD and root not in names:
                names.append(root)
        return names

    @property
    def label_lead(self) -> str:
        """Spaces right before ``{y}``: they belong to the label's tokens (``" positive"``)."""
        before = self.text.split("{" + LABEL_FIELD + "}")[0]
        return before[len(before.rstrip(" ")):]

    def render_parts(self, example: Mapping) -> tuple[str, str]:
        """(prefix, suffix) of one example, the label and its leading spaces left out."""
        before, after = self.text.split("{" + LABEL_FIELD + "}")
        before = before[: len(before) - len(self.label_lead)]
        try:
            return before.format(**example), after.format(**example)
        except (KeyError, IndexError) as err:
            raise ConfigError(
                f"template {self.text!r} needs field {err} that the dataset rows lack; "
                f"rows have fields {sorted(example)}. Pick a matching template= or fix dataset.*"
            ) from None

    def render(self, example: Mapping, label: str) -> str:
        """The full text of a labelled example (for display and tests)."""
        prefix, suffix = self.render_parts(example)
        return prefix + self.label_lead + label + suffix


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of an example's text before and after its label; ``choices``: where each example has labels of
    its own (an lm-eval task's per-document choices), their token ids after this prefix, and ``choice_chars``
    their lengths in characters (what lm-eval's ``acc_norm`` divides by)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...] | None = None
    choice_chars: tuple[int, ...] | None = None


def encode_continuation(tokenizer, context: str, continuation: str) -> list[int]:
    """Tokens of ``continuation`` as they appear after ``context`` (encode both, slice)."""
    full = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    if full[: len(ctx)] == ctx and len(full) > len(ctx):
        return full[len(ctx):]
    return tokenizer.encode(continuation, add_special_tokens=False)


def probed_read_shift(tokenizer, anchor: str, lead: str, name: str) -> int:
    """Where the original's marker probe reads label ``name``, in tokens after the end of ``anchor``.

    The original renders the template with a special marker token in place of the label, so the
    text before the label is tokenized as a segment of its own, and reads at the end of the
    common token prefix of that and the labelled text. Here: the common prefix of ``anchor +
    lead`` and ``anchor + lead + name``, minus ``anchor``'s own tokens. Positive when label
    tokens belong to the prompt (Gemma's " 1" is a space token + "1" and the probe's segment ends
    with the space); negative when the prompt's last tokens belong to the label (SmolLM2 writes
    '\n ' as one token but '\n yes' as '\n' + ' yes'). A label always keeps a token of its own.
    """
    context = tokenizer.encode(anchor, add_special_tokens=False)
    probe = tokenizer.encode(anchor + lead, add_special_tokens=False)
    full = tokenizer.encode(anchor + lead + name, add_special_tokens=False)
    if full[: len(context)] != context:
        return 0
    common = 0
    while common < min(len(probe), len(full)) and probe[common] == full[common]:
        common += 1
    return min(common - len(context), len(full) - len(context) - 1)


class PromptEncoder:
    """Tokenizes examples and labels for one (tokenizer, template, label set).

    Examples in a prompt are separated by a newline token, as in the protocol; the sequence
    starts with the tokenizer's BOS token when the tokenizer adds one.
    """

    def __init__(self, tokenizer, template: Template, label_names: Sequence[str], fold_shared_label_tokens: bool = False,
                 separator: str = "\n"):
        """``separator``: text between examples (a newline, as the protocol's EOS-to-newline swap).

        Where a label is read follows the original's marker probe (docs/protocol.md): the text
        before ``{y}`` is tokenized as if it ended there, and label tokens that this tokenization
        already holds (Gemma and Llama-3 write " 1" as a space token + "1", and the probe's
        prefix ends after the space) become the ``label_stem``, part of each example's prefix.
        Where the probe's segment ends earlier (SmolLM2's '\n ' token), the prompt's last tokens
        become the labels' first ones (``borrowed``), as in the original's bags.
        ``fold_shared_label_tokens`` (``first``/``exact``/``auto``): leading tokens that every
        label shares fold into the prompt, which makes ``first`` possible where the original would
        refuse the labels and leaves ``exact`` scores unchanged (a shared token's probability
        cancels in the renormalisation). Token sequences never change, only the read position."""
        if len(set(label_names)) != len(label_names):
            raise ConfigError(f"label set has duplicate names: {list(label_names)}")
        self.tokenizer = tokenizer
        self.template = template
        self.label_names = list(label_names)
        anchor = template.text.split("{" + LABEL_FIELD + "}")[0]
        anchor = anchor[: len(anchor) - len(template.label_lead)]
        anchor = anchor.split("}")[-1]  # the literal text right before the label
        self.label_ids: list[tuple[int, ...]] = [
            tuple(encode_continuation(tokenizer, anchor, template.label_lead + name)) for name in label_names
        ]
        for name, ids in zip(label_names, self.label_ids):
            if not ids:
                raise ConfigError(f"label {name!r} encodes to no tokens")
        shift = min(probed_read_shift(tokenizer, anchor, template.label_lead, name) for name in label_names)
        borrowed = tuple(tokenizer.encode(anchor, add_special_tokens=False)[shift:]) if shift < 0 else ()
        self.label_ids = [borrowed + ids for ids in self.label_ids]
        stem = max(shift, 0)
        if fold_shared_label_tokens:
            while stem < min(map(len, self.label_ids)) - 1 and len({ids[stem] for ids in self.label_ids}) == 1:
                stem += 1
        while stem and len({ids[:stem] for ids in self.label_ids}) > 1:  # a stem every label shares
            stem -= 1
        self.borrowed = borrowed[stem:]  # prompt tokens read as the labels' first tokens
        self.label_stem = self.label_ids[0][len(borrowed):stem]  # label tokens read as prompt
        self.label_ids = [ids[stem:] for ids in self.label_ids]
        self.separator = tuple(tokenizer.encode(separator, add_special_tokens=False))
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos: tuple[int, ...] = (bos,) if bos is not None and probe and probe[0] == bos else ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def encode(self, example: Mapping) -> EncodedExample:
        prefix, suffix = self.template.render_parts(example)
        prefix_ids = self.prefix_ids(prefix, example)
        if self.borrowed:
            if prefix_ids[-len(self.borrowed):] != self.borrowed:
                raise ConfigError(f"the text before the label of {prefix!r} does not end in the tokens that the "
                                  "labels start with; use label_mode=auto or exact")
            prefix_ids = prefix_ids[: -len(self.borrowed)]
        return EncodedExample(prefix_ids + self.label_stem, tuple(self.tokenizer.encode(suffix, add_special_tokens=False)))

    def prefix_ids(self, prefix: str, example: Mapping) -> tuple[int, ...]:
        """Token ids of an example's text before its label (image prompts put their images in here)."""
        return tuple(self.tokenizer.encode(prefix, add_special_tokens=False))

    def encode_all(self, examples: Sequence[Mapping]) -> list[EncodedExample]:
        return [self.encode(ex) for ex in examples]

    def encode_splits(self, data) -> dict[str, list[EncodedExample]]:
        """{"train", "test"}: the encoded examples of a task's unlabelled pool and test set."""
        return {"train": self.encode_all(data.train), "test": self.encode_all(data.test)}

    def context(self, examples: Sequence[EncodedExample], labels: Sequence[int]) -> list[int]:
        """Token ids of labelled demonstrations, each followed by the separator: the part of
        a prompt that queries can share."""
        return self.assemble([*examples, EncodedExample((), ())], labels)[0]

    def assemble(self, examples: Sequence[EncodedExample], labels: Sequence[int]) -> tuple[list[int], list[int]]:
        """Token ids of one prompt and the label-read position of every example.

        ``labels`` holds one label per rendered example: ``len(examples) - 1`` (the last
        example is an unlabelled query) or ``len(examples)``. The sequence stops right after
        the last example's prefix: nothing later can change the scores read.
        The read position is the index of the token whose next-token distribution gives the
        label, i.e. the last token of the example's prefix.
        """
        if len(labels) not in (len(examples) - 1, len(examples)):
            raise ValueError(f"{len(examples)} examples need {len(examples) - 1} or {len(examples)} labels, got {len(labels)}")
        ids = list(self.bos)
        positions = []
        for i, ex in enumerate(examples):
            ids.extend(ex.prefix)
            if not ids:
                raise ConfigError("an example's prompt is empty before its label; the template needs text before {y}")
            positions.append(len(ids) - 1)
            if i == len(examples) - 1:
                break
            ids.extend(self.label_ids[labels[i]] if ex.choices is None else ex.choices[labels[i]])
            ids.extend(ex.suffix)
            ids.extend(self.separator)
        return ids, positions


class ChoiceEncoder(PromptEncoder):
    """Examples whose labels are their own texts (an lm-eval task's ``doc_to_choice``, in the row's
    ``choices_field``), tokenized as lm-eval tokenizes a (context, continuation) pair: the continuation's tokens
    are those of context + continuation after the context's own. The label set names the K positions."""

    def __init__(self, tokenizer, template: Template, label_names: Sequence[str], choices_field: str,
                 separator: str = "\n"):
        super().__init__(tokenizer, template, label_names, separator=separator)
        self.choices_field = choices_field
        self.label_lead = template.label_lead

    def encode(self, example: Mapping) -> EncodedExample:
        prefix, suffix = self.template.render_parts(example)
        context = self.tokenizer.encode(prefix, add_special_tokens=False)
        choices = []
        for text in example[self.choices_field]:
            whole = self.tokenizer.encode(prefix + self.label_lead + text, add_special_tokens=False)
            choices.append(tuple(whole[len(context):]) if whole[:len(context)] == context else
                           tuple(self.tokenizer.encode(self.label_lead + text, add_special_tokens=False)))
        if len(choices) != self.num_labels:
            raise ConfigError(f"an example has {len(choices)} choices where the task's others have {self.num_labels}")
        return EncodedExample(tuple(context), tuple(self.tokenizer.encode(suffix, add_special_tokens=False)),
                              tuple(choices), tuple(len(text) for text in example[self.choices_field]))
