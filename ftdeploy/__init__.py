"""ftdeploy: fine-tune a model on your data and serve it in Ollama."""

__version__ = "0.1.0"
