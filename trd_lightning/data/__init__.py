"""Data: prompt sources, templates, the on-policy DataModule and the demo world."""
