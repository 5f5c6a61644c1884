"""finetune_trainer: the AMP + LoRA trainer the FineTuneJob worker pods run (see entrypoint.run)."""
