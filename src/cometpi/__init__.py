"""cometpi: two-party private Transformer inference (Comet, arXiv 2405.17485).

Layers, bottom to top: ``ring`` (Z_2^64, fixed point, CSPRNG), ``transport`` (framed channels and
counters), ``core`` (sessions, shares, open/reveal), ``dealer`` (correlated randomness), ``protocols``
(interactive algorithms on shares), ``party`` (handshake and session set-up), ``serve`` (processes),
``bench`` and ``cli``.
"""

__version__ = "0.1.0"
