"""The recipe engine: loading, validation, resolution into a plan, and applying the plan to a model."""
