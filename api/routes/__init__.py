"""API routers, one per resource: files, jobs, batches, objects (local downloads), health."""
