"""Ctrl-C held back while data moves (diskimg.host.interrupts), against the signal module's own behaviour."""

import signal
import threading

import pytest

from diskimg.host import interrupts

pytestmark = pytest.mark.usefixtures("ctrl_c")


def test_a_first_ctrl_c_waits_for_the_next_check():
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        signal.raise_signal(signal.SIGINT)  # does not raise here
        assert interrupts.pending()
        interrupts.check()
    assert not interrupts.pending()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_raises_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the first")
        signal.raise_signal(signal.SIGINT)
        reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_never_checked_is_raised_at_the_end():
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        signal.raise_signal(signal.SIGINT)
    with interrupts.deferred():  # and is not carried over into the next use
        interrupts.check()


def test_nothing_is_held_back_outside_or_without_ctrl_c():
    interrupts.check()
    with interrupts.deferred():
        with interrupts.deferred():  # nested: the outer one decides
            interrupts.check()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_program_s_own_handler_is_kept():
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            assert not interrupts.pending()
        assert received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_other_threads_install_nothing():
    seen = []

    def convert_in_a_thread():
        with interrupts.deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=convert_in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
