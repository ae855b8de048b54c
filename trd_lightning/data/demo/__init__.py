"""The embedded demo world: a synthetic reasoning task, its tokenizer and tiny teacher and student models."""
