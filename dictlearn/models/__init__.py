"""Language models: named activation sites (hooks), loading, the embedded default model and the
text corpora they read."""
