"""``make bench``: speed, memory and accuracy benchmarks on the configs users run.

Each benchmark is a function ``(quick[, device]) -> list[dict]`` in its own module (prepare,
train, evaluate, serve, accuracy); ``benchmarks.runner`` runs each in a child process.
"""
