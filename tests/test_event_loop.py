"""`corral serve --loop`: which event loop the server runs on."""

import asyncio
import importlib.util

import pytest

from corral.supervisor.config import Config
from corral.web.cli import build_parser, config_from, new_event_loop


def test_loop_flag_and_environment_reach_the_config():
    args = build_parser().parse_args(["serve", "--loop", "asyncio"])
    assert config_from(args, environ={}).loop == "asyncio"
    args = build_parser().parse_args(["serve"])
    assert config_from(args, environ={"CORRAL_LOOP": "uvloop"}).loop == "uvloop"
    assert config_from(args, environ={}).loop == "auto"


def test_unknown_loop_is_refused():
    with pytest.raises(ValueError, match="loop must be one of"):
        Config(loop="twisted")


def test_asyncio_choice_gives_the_stdlib_loop():
    loop = new_event_loop("asyncio")
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_auto_uses_uvloop_exactly_when_it_is_installed():
    loop = new_event_loop("auto")
    try:
        has_uvloop = importlib.util.find_spec("uvloop") is not None
        assert type(loop).__module__.startswith("uvloop") == has_uvloop
        loop.run_until_complete(asyncio.sleep(0))  # a working loop either way
    finally:
        loop.close()
