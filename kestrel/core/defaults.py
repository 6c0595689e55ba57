"""Engine defaults that torch-free code (the CLI's option table, schemas) needs too.

Kept apart from `kestrel.core.models`, which imports torch, so that naming the default model does
not load it; `kestrel.core.models` re-exports it.
"""

DEFAULT_MODEL = "smollm2-135m"
