"""Custom Diffusion fine-tuning: job spec, data, the training loop, checkpoints and progress lines.

Entry point for launchers: ``python -m trainer --spec spec.json`` (see docs/job-spec.md).
"""
