"""`task=summarization`: its settings (settings.py, no torch) and its Task (task.py)."""
