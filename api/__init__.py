"""The HTTP API of the job service (FastAPI): a thin layer over ``worker``.

``api.main.create_app(settings)`` builds the application; routes validate at the edge, call
``worker.jobs`` and shape the reply. No model code, no torch.
"""
