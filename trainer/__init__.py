"""The training job: per-step plans executed by the SP runtime on a Megatron-core GPT."""
