"""The web service: the FastAPI app, the one upload admission and the service's limits, the guards,
the video routes, and the private-mode static site.
"""
