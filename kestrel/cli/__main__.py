"""``python -m kestrel.cli``: what the service's processes and the tests run."""

from kestrel.cli import app

if __name__ == "__main__":
    app()
