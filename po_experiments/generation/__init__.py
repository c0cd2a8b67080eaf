"""Text generation for the win-rate outputs and D' answers: HF generate in this process, or vLLM in its own."""
