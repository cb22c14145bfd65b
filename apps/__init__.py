"""The Flower app that ``flwr run .`` runs: ``server_app.py``, ``client_app.py``, ``task.py``."""
