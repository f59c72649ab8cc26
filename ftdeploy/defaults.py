"""The defaults several modules share, in a module that imports nothing: the embedded base and data, where Ollama
is asked, and how long each Ollama call may wait."""

DEMO_BASE_MODEL = "smollm2-135m-instruct"
DEMO_DATA = "demo"
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"

# Seconds; OllamaClient's defaults too. No Ollama call waits without a bound.
OLLAMA_CONNECT_TIMEOUT, OLLAMA_TIMEOUT, OLLAMA_LONG_TIMEOUT = 5.0, 60.0, 600.0
