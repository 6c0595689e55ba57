"""The engine: importable on its own (torch, transformers), never imports fastapi or rq."""
