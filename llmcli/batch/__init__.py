"""Batch jobs: a checked input, its output written in atomic parts and merged (job.py), the
OpenAI Batch format answered by serve's app (openai_batch.py), and the runners that do the work
here or on Ray Data (runner.py). Imports engine and server, never cli; Ray only inside run_ray."""
