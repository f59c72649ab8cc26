"""Names vulture (pyproject's [tool.vulture], run by test_lint.py) would report as unused, with why each is used.

Never imported or run: vulture reads it, and a name written here counts as used wherever it is defined (`_.name`:
a name vulture matches anywhere, for what is no module attribute). Add a name only with its reason; code that nothing
calls is removed, not listed.
"""
# ruff: noqa: B018
from ftdeploy import local_server, quants, results
from ftdeploy.ollama import OllamaClient

_ = None

# Called by a framework, not by our code.
_.frame  # cli.py: the signal handler's (signum, frame) signature
_.obj  # cli.py: click's context object; @click.pass_obj hands it to the data subcommands
_.on_train_begin  # stages/train.py: transformers' TrainerCallback hooks, with their (args, state, control) signature
_.on_log
_.control
_._body  # templates.py: the {% generation %} extension's method, called by name from the compiled template
_.__getattr__  # config.py: the module's (PEP 562), which Python calls to load the config models on first use
_.__dir__  # __init__.py: the package's (PEP 562), which dir() and editors' completion call to list the API's names

# Set on another library's object, which reads it.
_.encode_special_tokens  # tokenizers.Tokenizer: whether special tokens in the text are split (data/fast.py)
_.nthread  # llama_cpp's llama_model_quantize_params (stages/export.py)
_.data_alignment  # gguf.GGUFWriter (stages/export.py)

# Written to the manifest (Result.to_dict) and read there, never by attribute.
results.TrainResult.train_loss
results.TrainResult.final_loss
results.TrainResult.per_device_batch
results.TrainResult.examples_per_s
results.TrainResult.dataset_trained_tokens
results.TrainResult.resumed_from
results.LossPoint.lr  # metrics.train.loss_history (TrainMetrics); the plot reads step and loss
results.LossPoint.elapsed_s

# Library API that only tests and their harness call today (a decision for their owners: use them, or move them to
# tests/ with their callers).
local_server.free_port  # a free loopback port, for the multinode and registry tests
OllamaClient.list_models  # the integration tests' view of a server's models
quants.LADDER  # the ladder of common quant types, smallest to largest (test_quants.py)
