"""The docs keep up with the code."""

from pathlib import Path

from web.cli import SERVE_FLAGS, env_name

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_serve_flag_is_documented():
    text = (DOCS / "configuration.md").read_text()
    for name in SERVE_FLAGS:
        assert f"`--{name.replace('_', '-')}`" in text and f"`{env_name(name)}`" in text, name
