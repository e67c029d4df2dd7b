"""Language models: named activation sites (hooks) and the embedded default model."""
