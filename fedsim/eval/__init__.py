"""Evaluation of round checkpoints: question sets, generation, offline metrics, LLM-as-judge, and
the evaluation job that ties them together (`fedsim eval`)."""
