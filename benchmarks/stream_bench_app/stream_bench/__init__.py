"""A small Flower app that times flsplit's stream data plane next to Flower messages.

The ClientApp echoes each request's array back; the ServerApp drives lockstep steps with
every node over ``StreamDataPlane`` (``mode="stream"``) and over ``MessageDataPlane`` in the
same deployment and writes its timings as JSON (run-config key ``output``). Driven by
``benchmarks/bench_stream_deployment.py``.
"""
