"""Layer 2: fine-tuning on Ray Train, as public building blocks that SFT, SFTMix's training
dynamics and LM-Mixup's GRPO compose (may import ray; never imports the stages).

- ``engines``: ``DeepSpeedEngine`` and ``DDPEngine`` (``make_engine``), ``build_model``,
  ``param_groups``, checkpoint save/resume and the loop's own checkpoint state;
- ``export``: Hugging Face export (model or LoRA adapter + tokenizer, optionally merged
  weights) at any step, on all ranks, to any directory;
- ``metrics``: the per-step metrics log (CSV + TensorBoard), ``read_metrics``, the loss plot;
- ``objectives``: one module per loss (``ntp``, ``mdit``, ``sftmix``) behind one interface,
  in one registry ``OBJECTIVES`` keyed by ``mixray.choices.LOSSES``;
- ``loop``: ``train_loop_per_worker(config)`` over an engine and an objective, and ``fit``
  (the ``TorchTrainer``);
- ``deepspeed_config``: the pure ``build_deepspeed_config(settings) -> dict``.

Importing this package imports nothing heavy; torch, deepspeed, transformers and
ray are imported where they are used (DeepSpeed picks its accelerator at import,
so ``engines.setup_worker`` must run first on a worker).
"""
