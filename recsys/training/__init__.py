"""Training GRU4Rec: the session-parallel loop, checkpoints and resume, the allocator setting."""
