"""Fixtures of the server tests: one `qwen3-aot serve` process per artifact for the whole
session, the same artifacts in-process for the expected answers, and a deadline on every test
that fails it instead of hanging CI."""

from __future__ import annotations

import signal
from typing import Iterator

import pytest

pytest.importorskip("fastapi")  # the serve extra
pytest.importorskip("openai")

from serving import Server, running  # noqa: E402

DEADLINE_S = 60  # per test; @pytest.mark.deadline(S) for another


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): fail the test if it runs longer (default 60 s)")


class Deadline(Exception):
    pass


@pytest.fixture(autouse=True)
def deadline(request):
    """SIGALRM interrupts a test blocked on a socket or a lock, so a hang fails here."""
    mark = request.node.get_closest_marker("deadline")
    seconds = mark.args[0] if mark else DEADLINE_S

    def fire(signum, frame):
        raise Deadline(f"{request.node.name} ran past its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tiny_server(tiny_artifact, tmp_path_factory) -> Iterator[Server]:
    """The trained fixture served as "tiny", shared by the tests that use it (in the xdist_group
    "tiny_server", so one worker starts it: a server and its engine process, about 10 s of CPU)."""
    with running(tiny_artifact, tmp_path_factory.mktemp("serve") / "tiny.log", "--served-model-name", "tiny",
                 "--max-queue", "256") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_engine(tiny_artifact):
    """The same artifact in-process: what the server's answers must equal."""
    from qwen3_aot import runtime

    with runtime.load(tiny_artifact) as engine:
        yield engine


@pytest.fixture(scope="session")
def qwen_server(qwen_artifact, tmp_path_factory) -> Iterator[Server]:
    """The real-tokenizer artifact served as "qwen", shared by the modules that use it (they are
    in one xdist_group, so one worker builds the artifact and starts this server once)."""
    with running(qwen_artifact, tmp_path_factory.mktemp("serve") / "qwen.log", "--served-model-name", "qwen") as s:
        yield s


@pytest.fixture(scope="session")
def qwen_engine(qwen_artifact):
    """The same artifact in-process, for the answers the server's must equal."""
    from qwen3_aot import runtime

    with runtime.load(qwen_artifact) as engine:
        yield engine
