"""The dealer lookahead: both parties guess the dealer requests of layers not yet run from the layers
just done, and fetch them ahead (``DealerLookahead``), beside the dealer's plan arithmetic
(``provider.plan_delta``, ``provider.plan_shift``)."""

from __future__ import annotations

from .provider import plan_delta, plan_shift


class DealerLookahead:
    """Prefetches the dealer material of layers not yet run, guessed from the layers just done, so that
    a first query of a shape and every decoding step wait on the dealer for their first layers only.

    Every layer makes the same requests but for the index of its weights: the guess of layer i+1 is
    layer i's plan moved on by the difference between two consecutive layers (``dealer.plan_delta``,
    learnt once from layers 0 and 1 and kept for later forwards).  ``AHEAD`` layers are kept
    requested ahead; each guess is checked request by request (``Provider.speculate``), and the first
    wrong one ends the guessing for the rest of the forward.  ``tail_begin``/``tail_end`` do the same
    for what follows the last layer of a decoding step (the final norm, the LM head, the argmax: the
    same requests at every step), guessed from the step before.  ``ShareModel`` keeps one per session
    (both parties make the same guesses); without a provider (floats, ring simulation) it does nothing,
    and nothing where a replayed plan of the whole query already covers the indices."""

    AHEAD = 2

    def __init__(self, provider=None):
        self.p = provider
        self.delta = None  # plan_delta of two consecutive layers
        self.tail: list | None = None
        self._tail_start = None
        self.on = False
        self.decoding = False  # set by greedy_decode: only its forwards end in the guessed tail

    def forward_begin(self, layers: int) -> None:
        self.layers, self.ahead, self.last, self.guess = layers, 0, None, None
        self.on = self.p is not None
        self._misses = self.p.mispredictions if self.on else 0

    def layer_begin(self) -> None:
        if self.on:
            self._start = self.p.index

    def layer_end(self, i: int) -> None:
        if not self.on:
            return
        if self.p.mispredictions != self._misses:  # a layer was not as guessed: stop, learn again next time
            self.on, self.delta = False, None
            return
        plan = self.p.plan_since(self._start)
        if self.last is not None and self.delta is None:
            self.delta = plan_delta(self.last, plan)
        self.last = plan
        if self.delta is None:
            self.on = i == 0  # after layers 0 and 1 without a delta: the layers differ, no guessing
            return
        if self.guess is None:
            self.guess, self.ahead = plan, i + 1
        while self.ahead < min(i + 1 + self.AHEAD, self.layers):
            guess = plan_shift(self.guess, self.delta)
            if guess is None:
                self.on = False
                return
            self.p.speculate(guess)
            self.guess, self.ahead = guess, self.ahead + 1

    def tail_begin(self) -> None:
        if self.p is not None and self.decoding:
            if self.tail is not None:
                self.p.speculate(self.tail)
            self._tail_start = self.p.index

    def tail_end(self) -> None:
        if self.p is not None and self._tail_start is not None:
            self.tail, self._tail_start = self.p.plan_since(self._tail_start), None
