"""`python -m twigvlm.evaluation` prints the folder of our task YAMLs, for `lmms-eval --include_path`."""

from . import TASKS_DIR


print(TASKS_DIR)
