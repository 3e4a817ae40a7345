"""Celery workers of TraceChain Settlement (the app, its tasks and the beat schedule)."""
