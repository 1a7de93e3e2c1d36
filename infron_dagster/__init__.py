"""infron-dagster: LLM batch inference in Dagster."""
