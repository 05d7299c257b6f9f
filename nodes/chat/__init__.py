"""The ``chat`` capability: local llama.cpp, Anthropic Claude, OpenAI-compatible servers."""
