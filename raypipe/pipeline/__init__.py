"""Ray Data pipelines: thin stage adapters over the engine, the job builder, resume logic."""
