"""A clock that tests move by hand: the services take a `clock` callable, and time moves only when
the test sets `now`."""


class Clock:
    """A clock the test moves by hand (`clock.now += 5`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
