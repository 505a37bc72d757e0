"""ATE-Bench: agent-task efficiency of coding agents on training-framework tasks."""
