"""foedus's public Python API: `from foedus import model` to open and write model files.

The distribution's own name, so `import foedus` never clashes with a project's own `model.py`.
"""
