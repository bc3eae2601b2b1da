"""Many requests over one job: scheduler, requests, text streams, chat templates, metrics, the HTTP API."""
