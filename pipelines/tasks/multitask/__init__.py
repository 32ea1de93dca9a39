"""`task=multitask`: its settings (settings.py, no torch), its Task (task.py) and its model (model.py)."""
