"""Serving: the FastAPI app (OpenAI-compatible chat completions and task endpoints), the continuous-
batching scheduler that owns the model, and `vlforge serve`."""
