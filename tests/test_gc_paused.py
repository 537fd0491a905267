"""trail.model_runner.gc_paused: no garbage-collection pass while CUDA graphs are captured (a pass
could free another engine's CUDA objects mid-capture), and the collector's state comes back."""
import gc

import pytest

from trail.model_runner import gc_paused


def test_gc_is_off_inside_and_restored_after_even_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_garbage_from_before_is_collected_first_and_a_disabled_collector_stays_off():
    class Cycle:
        pass

    freed = []
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    import weakref

    weakref.finalize(a, freed.append, "a")
    del a, b
    gc.disable()
    try:
        with gc_paused():
            assert freed == ["a"]
        assert not gc.isenabled()
    finally:
        gc.enable()
