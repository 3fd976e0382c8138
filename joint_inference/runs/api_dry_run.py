"""``dry_run=true``: what a ``backend=openai`` run would send and cost, without sending anything.

The whole run goes through with a counting client (:class:`~joint_inference.api.client.DryRunClient`) in a
temporary directory: zero-shot and baseline prompts are the real ones; the rounds' demonstrations are drawn from
stand-in answers (classification: uniform label scores; generation: a stand-in response of
``api.dry_run_output_tokens`` tokens that states an answer), so their prompt tokens are estimates. Requests
already in the run's cache are counted apart (a rerun does not pay for them). Prompt tokens are exact for
classification (the token ids sent), counted with the model's tokenizer where it loads, else about 4
characters a token; images count ``model.tokens_per_image`` (85: GPT-4o at ``detail: low``). Output tokens: 1
per classification request; for generation the estimate and the bound (``max_new_tokens`` per response).
Nothing is written to the run directory; the summary is printed and returned.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, open_dict

from ..core.errors import ConfigError
from ..api.client import DRY_RUN, DryRunTally, cost

log = logging.getLogger(__name__)


def dry_run(cfg: DictConfig, run) -> dict:
    """Count ``run(cfg)``'s requests with nothing sent; print and return the tally and the cost."""
    if cfg.backend != "openai":
        raise ConfigError("dry_run=true counts the requests of a model behind an API; add backend=openai")
    api = cfg.api
    cache_dir = api.cache_dir or str(Path(cfg.output_dir) / "api_cache")
    tally = DryRunTally()
    quiet = logging.getLogger("joint_inference")
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="joint_inference_dry_run.") as tmp:
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.dry_run = False
            sub.output_dir = tmp
            sub.progress = False
            sub.allow_long_cpu_run = True  # the CPU guard estimates local scoring; nothing runs locally here
            sub.api.cache_dir = cache_dir
        DRY_RUN.update(tally=tally, output_tokens=api.dry_run_output_tokens)
        quiet.setLevel(logging.WARNING)  # the stages' accuracies of stand-in answers mean nothing
        try:
            run(sub)
        finally:
            DRY_RUN.clear()
            quiet.setLevel(level)
    m = cfg.model
    price_in, price_out = m.price_per_million_input_tokens, m.price_per_million_output_tokens
    summary = {**tally.__dict__, "base_url": m.base_url, "model": m.name,
               "cost_usd": cost(tally.prompt_tokens, tally.output_tokens, price_in, price_out),
               "max_cost_usd": cost(tally.prompt_tokens, tally.max_output_tokens, price_in, price_out)}
    print(summary_text(summary, cache_dir, price_in, price_out, api.dry_run_output_tokens))
    return summary


def summary_text(s: dict, cache_dir: str, price_in, price_out, output_tokens: int) -> str:
    lines = [f"dry run, nothing sent: {s['requests']:,} requests to {s['base_url']} (model {s['model']})"
             + (f"; {s['cached']:,} more are already cached in {cache_dir}" if s["cached"] else "")
             + (f"; {s['duplicates']:,} repeat a request of their batch (sent once)" if s["duplicates"] else ""),
             f"  prompt tokens:  {s['prompt_tokens']:,}",
             (f"  output tokens:  ~{s['output_tokens']:,} (responses of ~{output_tokens} tokens: "
              f"api.dry_run_output_tokens), at most {s['max_output_tokens']:,}")]
    if s["cost_usd"] is None:
        lines.append("  cost: set model.price_per_million_input_tokens and model.price_per_million_output_tokens")
    else:
        lines.append(f"  cost at ${price_in}/M input and ${price_out}/M output tokens: ~${s['cost_usd']:,.2f} "
                     f"(at most ${s['max_cost_usd']:,.2f})")
    return "\n".join(lines)
