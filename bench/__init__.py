"""The repository benchmark: chatstream's SSE and WebSocket transports against bare peers.

`python -m bench.run --help` runs it; `bench/peers.py` is the bare Litestar app it
compares against. See bench/README.md and docs/benchmarks.md.
"""
