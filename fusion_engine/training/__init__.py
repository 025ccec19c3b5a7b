"""Training: fit (frozen, cached features) and finetune, the feature cache, baselines, evaluation, distributed."""
