"""Models behind an OpenAI-compatible HTTP API (``backend=openai``).

* :mod:`.client`: requests with a bounded number in flight, retries with exponential backoff on 429, 5xx and
  lost connections, a progress bar, the key read from ``$OPENAI_API_KEY`` (never logged or written), and an
  on-disk cache of answers keyed by everything that determines them (:mod:`.cache`).
* :mod:`.scoring`: the classification scorer: label log-probs read from the next token's ``top_logprobs``.
* :mod:`.generators`: GSM8K / MMLU-Pro generation through ``/completions`` or ``/chat/completions``.
* :mod:`.mmmu`: MMMU and MMMU-Pro with images, chain of thought, unsupervised ICL rounds.
* :mod:`.dry_run`: count requests, prompt tokens and cost without sending anything.

``httpx`` is imported only when a client is built: ``pip install -r requirements_api.txt``.
"""
