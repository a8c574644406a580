"""The streaming core: generations, their event logs, readers and adapters.

Nothing here imports Litestar except the transports (`sse.py`, later `ws.py`).
"""
