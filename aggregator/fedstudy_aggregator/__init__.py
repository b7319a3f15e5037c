"""The aggregator: rounds, strategies, update checks, checkpoints, /status.

- ``main``: the ``fedstudy aggregator`` command.
- ``server``: the gRPC server, the HTTP server and the round timer put together.
- ``service``: the gRPC servicer, a thin layer over ``rounds.Coordinator``.
- ``rounds``: the round state machine and every update check.
- ``strategies``: FedAvg, FedProx, FedAdam, FedYogi; the arithmetic as pure functions.
- ``checkpoint``, ``outputs``, ``records``: what goes to disk, and in which form.
- ``web``: ``/healthz``, ``/status``, ``/metrics``.
"""
