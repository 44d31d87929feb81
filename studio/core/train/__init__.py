"""Recovery: fine-tuning and distillation (FinetuneJob), gradual pruning, schedules,
checkpoints.

May import: latency, prune, plan, scan, models and the shared modules.
"""
