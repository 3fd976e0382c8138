"""The methods: zero-shot, ICL and unsupervised ICL, unsupervised fine-tuning, generation tasks, MMLU, MMMU."""
