"""Load generator for imserver: ``python -m bench <scenario> [options]``.

Scenarios live in their own modules (``bench.pairs``, later ``fanout``,
``idle``, ``storm``, ``history``); what they share (connections, auth, timing,
worker processes, the spawned server, result output) is in ``bench.common``.
See ``bench/README.md``.
"""
