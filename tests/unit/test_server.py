"""The served process's garbage collector settings (app/server.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.server import GC_YOUNG_THRESHOLD, tune_garbage_collector


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_startup_objects_are_left_out_of_collections_and_young_ones_collected_less_often() -> None:
    made_at_startup = type("Routes", (), {})()  # an object the collector tracks, made before startup ends
    _, middle, old = gc.get_threshold()
    tune_garbage_collector()
    assert gc.get_freeze_count() > 0
    assert not any(o is made_at_startup for o in gc.get_objects())  # frozen: no generation holds it
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
