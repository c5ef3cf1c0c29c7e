"""``python -m examples.fastapi``: the FastAPI chat example on http://127.0.0.1:8000/."""

from ..serve import run
from .app import create_app

if __name__ == "__main__":
    run(create_app(), "FastAPI")
