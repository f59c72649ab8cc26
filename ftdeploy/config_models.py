"""The config's keys, declared as pydantic models: each key's type, default, range (Field ge/gt/le/lt) and help
(Field description, shown by `ftdeploy config --keys`) in one declaration.

Imported on first use through ftdeploy.config (pydantic's import would slow down every command, `--help`
included); `build` turns pydantic's findings into ftdeploy's own messages, every one of them at once.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, BeforeValidator, Field, PrivateAttr, Strict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .defaults import (
    DEFAULT_OLLAMA_HOST,
    DEMO_BASE_MODEL,
    DEMO_DATA,
    OLLAMA_CONNECT_TIMEOUT,
    OLLAMA_LONG_TIMEOUT,
    OLLAMA_TIMEOUT,
)

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml11_float(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads `2e-4`, with no dot, as a string; every trainer's docs write it that way.
    return float(value) if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()) else value


def _number_as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _comma_list(value: Any) -> Any:
    # "a,b" from a flag or --set
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


# Strict: no bool for a number, no float or text for an integer, only a list for a list. A number is finite (every
# number key has a range); a text key takes a number as its text; a list of texts takes "a,b".
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_yaml11_float)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict(), BeforeValidator(_number_as_text)]
StrList = Annotated[list[Str], Strict(), BeforeValidator(_comma_list)]
# A key that takes `auto` or a value (train.batch_size, data.packing): one problem named for both when neither fits.
AutoBool = Bool | Literal["auto"]
# Any mapping: its keys and values are checked by ftdeploy.config's checks, which name the problem.
AnyMapping = Annotated[dict[Any, Any], Strict()]


class _Section(BaseModel, extra="forbid"):
    """A config section: a key it does not declare is an error."""


def _path_only(value: Any) -> Any:
    # a data.sources item given as just its path
    return {"path": value} if isinstance(value, str) else value


Layout = Literal["auto", "messages", "sharegpt", "alpaca", "pairs", "prompt_completion", "text", "preference", "kto"]


class DataSourceConfig(_Section):
    """One source of a mix (data.sources): where its rows come from, how many of them the mix takes, and the
    settings that differ from the data section's (unset: the data section's)."""

    path: Str = Field(description=(
        "A file (.jsonl, .json, .csv, .parquet), a folder of them, a Hugging Face dataset id, or 'demo'."))
    weight: Float | None = Field(default=None, gt=0, description=(
        "Relative share of the mixed training rows (weights 3 and 1: three rows of this source to one of the other); "
        "set on every source or on none (none: every row of every source, after max_rows)."))
    max_rows: Int | None = Field(default=None, ge=1, description=(
        "At most this many of the source's rows (a sample fixed by train.seed) enter the mix, before the weights."))
    format: Layout | None = Field(default=None, description="Its layout (unset: data.format).")
    columns: AnyMapping | None = Field(default=None, description="Its column names (unset: data.columns).")
    split: Str | None = Field(default=None, description="Split of a Hugging Face dataset id (unset: data.split).")
    hub_config: Str | None = Field(default=None, description="Config of a Hugging Face dataset id (unset: "
                                                             "data.hub_config).")
    revision: Str | None = Field(default=None, description=(
        "Revision of a Hugging Face dataset id (unset: data.revision); the commit read is recorded."))
    eval_path: Str | None = Field(default=None, description=(
        "This source's eval rows (same layouts); unset: rows held out of the source by data.eval_split, unless "
        "data.eval is set."))


class DataConfig(_Section):
    train: Str = Field(default=DEMO_DATA, description=(
        "Training data: a JSONL file of chat messages, or 'demo' for the bundled demo facts."))
    sources: list[Annotated[DataSourceConfig, BeforeValidator(_path_only)]] = Field(default_factory=list, description=(
        "Several datasets mixed into one training set instead of data.train (README, mixing datasets): each "
        "{path, weight, max_rows, format, columns, split, hub_config, revision, eval_path}; the mix is drawn with "
        "train.seed, and the data stage reports each source's rows read, rows kept and share."))
    oversample: Bool = Field(default=False, description=(
        "With weights on data.sources: false, the mix is as large as the scarcest source allows and no row repeats; "
        "true, as large as the most plentiful source needs, the rows of the others repeated (sampling with "
        "replacement, each row as evenly as the count allows)."))
    revision: Str | None = Field(default=None, description=(
        "Revision (branch, tag or commit) of a Hugging Face dataset id in data.train or data.eval; the commit it "
        "resolves to is read, fingerprinted (an upstream change prepares the data again) and named in the GGUF."))
    eval: Str | None = Field(default=None, description=(
        "Eval data (same format, each assistant turn is the expected answer); default: the bundled demo eval set with "
        "'demo', else a split of train."))
    eval_split: Float | None = Field(default=None, ge=0, lt=1, description=(
        "Fraction of train held out for eval when no eval file is given (deterministic by seed); 0: hold out "
        "nothing. Unset (the default): data of 200 rows or more holds out 5% of its rows, at most 50, for verify's "
        "reference scoring; smaller data trains on every row, and verify compares the served model with the merged "
        "one on a sample of the training prompts (no reference scoring: that needs eval rows)."))
    format: Layout = Field(default="auto", description=(
        "Dataset layout (auto: detected from the columns); preference: chosen/rejected pairs (train.method dpo, "
        "orpo or kto), kto: labelled answers (train.method kto)."))
    columns: AnyMapping = Field(default_factory=dict, description=(
        "Column names for other layouts: prompt, response, system (e.g. {prompt: question, response: answer})."))
    on_bad_row: Literal["error", "skip"] = Field(default="error", description=(
        "A bad row stops the run (error) or is dropped and reported (skip)."))
    hub_config: Str | None = Field(default=None, description="Config name of a Hugging Face dataset id (e.g. v0).")
    split: Str = Field(default="train", description="Split of a Hugging Face dataset id.")
    packing: AutoBool = Field(default="auto", description=(
        "How rows make training batches (sft). auto: where rows vary in length, each batch's rows end to end in one "
        "sequence without padding, each row keeping its own positions and attention (the same loss and gradients as "
        "padding, without computing pad tokens); true: the data stage packs the rows best-fit into sequences of up to "
        "max_seq_length, trained the same way (a batch then holds more rows, an epoch fewer steps); false: each batch "
        "padded to its longest row. Training first checks that the model's attention keeps rows apart, and pads, "
        "with a notice, where it does not."))
    system_prompt: Str | None = Field(default=None, description=(
        "System prompt prepended to every conversation that has none."))
    chat_template: Str | None = Field(default=None, description=(
        "A chat template to train and serve with instead of the base model's own (as Axolotl's chat_template and "
        "Unsloth's get_chat_template do): a Jinja file, or `chatml-tools` (ChatML with Qwen2.5's tool-call "
        "layout). For a base without a template, or to train tool calls on one whose template has none. It must "
        "be a format ftdeploy serves (README, chat formats)."))
    max_seq_length: Int = Field(default=2048, ge=1, le=1 << 20, description=(
        "Longer sequences are truncated (and counted)."))
    train_on: Literal["assistant", "all"] = Field(default="assistant", description=(
        "Which tokens carry loss: assistant turns only, or every token."))
    max_row_bytes: Int = Field(default=1 << 20, ge=0, description=(
        "Largest row accepted, in bytes of text (UTF-8, all its fields): a longer row is a bad row, refused before "
        "it is tokenized (a 30 MB row would cost a minute and gigabytes to tokenize). The default, 1 MiB, is about "
        "250k tokens, far beyond max_seq_length; raise it for longer rows. 0: no limit."))


class LoraConfig(_Section):
    r: Int = Field(default=16, ge=1, le=4096, description="LoRA rank.")
    alpha: Int = Field(default=16, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: Float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout (the share of inputs zeroed).")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train.")
    target_modules: StrList = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projections that get adapters.")
    finetune_vision: bool = Field(default=False, description=(
        "Vision models: put adapters on the vision tower and its projector too (default: on the language model "
        "only, which keeps what the model sees as the base saw it)."))


class TrainConfig(_Section):
    engine: Literal["auto", "unsloth", "hf"] = Field(default="auto", description=(
        "auto: unsloth when CUDA and unsloth are present, else hf (transformers + PEFT + TRL)."))
    method: Literal["sft", "dpo", "orpo", "kto", "grpo"] = Field(default="sft", description=(
        "Training method: sft (supervised, on chats), dpo (Direct Preference Optimization, on chosen/rejected pairs), "
        "orpo (Odds Ratio Preference Optimization: SFT on the chosen answer and an odds-ratio preference term in one "
        "loss, no reference model; on the same pairs), kto (Kahneman-Tversky Optimization, on answers labelled good "
        "or bad), grpo (Group Relative Policy Optimization: the model answers each prompt several times and learns "
        "toward the answers your reward functions score higher; on prompts); TRL's trainers on either engine. The "
        "data's layout must match: preference pairs for dpo and orpo, labelled answers (or pairs, split) for kto, "
        "prompts (or chats, whose last answer becomes the `answer` column) for grpo. Settings: the preference "
        "section; grpo: the grpo section."))
    max_steps: Int = Field(default=60, ge=0, description="Optimizer steps (overrides epochs when > 0).")
    epochs: Float = Field(default=1.0, gt=0, description="Epochs, used when max_steps is 0.")
    learning_rate: Float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: Annotated[Int, Field(ge=1)] | Literal["auto"] = Field(default="auto", description=(
        "Per-device batch size (an integer >= 1), or auto: on a CUDA GPU (sft, one process), the largest micro-batch "
        "that fits its free memory and divides the global batch of 2 x gradient_accumulation, the accumulation making "
        "up the rest, so what a step learns stays the same; elsewhere 2. The batch trained with is logged and "
        "recorded in the manifest."))
    gradient_accumulation: Int = Field(default=4, ge=1, description="Gradient accumulation steps.")
    warmup_steps: Int = Field(default=5, ge=0, description="Linear warm-up steps.")
    weight_decay: Float = Field(default=0.01, ge=0, le=1, description="Weight decay.")
    lr_scheduler: Str = Field(default="linear", description="Learning-rate schedule (transformers name).")
    optim: Str = Field(default="auto", description="Optimizer; auto: adamw_8bit on CUDA, adamw_torch on CPU.")
    seed: Int = Field(default=3407, ge=0, le=2**32 - 1, description="Random seed.")
    load_in_4bit: Bool = Field(default=True, description=(
        "QLoRA: load the base in 4-bit NF4 (CUDA only; ignored on CPU)."))
    load_in_8bit: Bool = Field(default=False, description=(
        "Load the base in 8-bit (bitsandbytes LLM.int8, CUDA only) instead of 4-bit; set load_in_4bit false with it."))
    gradient_checkpointing: AutoBool = Field(default="auto", description=(
        "Recompute activations in the backward pass instead of keeping them: less memory, about a third more time a "
        "step. auto: off when the batch fits the free memory with a margin (the GPU's; on CPU, the RAM available), "
        "else on; true: on; false: off. On is Unsloth's offloaded mode on the unsloth engine. The choice is logged "
        "and recorded in the manifest."))
    logging_steps: Int = Field(default=1, ge=1, description="Log loss every N steps.")
    save_steps: Int = Field(default=50, ge=0, description=(
        "Checkpoint every N steps (0: never); a rerun after a crash resumes from the newest."))
    nproc: Int = Field(default=1, description=(
        "Training processes on this host (one per GPU); above 1, training runs under torch's distributed launcher "
        "(torchrun)."))
    nnodes: Int = Field(default=1, description="Hosts taking part in training; each runs the same command with its own "
                                       "--node-rank.")
    node_rank: Int = Field(default=0, description=(
        "This host's rank among nnodes (0 writes the adapter and goes on to merge, export and register)."))
    master_addr: Str = Field(default="127.0.0.1", description=(
        "Address of the rank-0 host, reachable from every node (multi-node only)."))
    master_port: Int = Field(default=29500, description=(
        "Rendezvous port on the rank-0 host (multi-node only; one host picks a free port)."))
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(default="ddp", description=(
        "Multi-process strategy: ddp (a full copy per GPU), fsdp (sharded, hf engine), deepspeed (ZeRO-3, hf engine)."))
    deepspeed_config: Str | None = Field(default=None, description=(
        "DeepSpeed JSON for strategy=deepspeed (default: the bundled ZeRO-3 config)."))
    keep_global_batch: Bool = Field(default=True, description=(
        "With several processes keep batch_size x gradient_accumulation as the global batch (accumulation is divided "
        "by the world size), so a config trains the same on 1 or N GPUs; false: each process takes the whole batch "
        "(global batch grows with N, as in Axolotl)."))
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(default="none", description=(
        "Experiment tracker for the training logs (loss, learning rate, grad norm), through transformers' own "
        "integration: tensorboard (event files in the run's tensorboard/ folder), wandb (Weights & Biases: project "
        "$WANDB_PROJECT, run named after the run), mlflow (experiment $MLFLOW_EXPERIMENT_NAME at "
        "$MLFLOW_TRACKING_URI); its package must be installed (pip install tensorboard, wandb or mlflow). The report "
        "links the tracker's run. Not part of the train fingerprint: changing it retrains nothing."))


class PreferenceConfig(_Section):
    beta: Float = Field(default=0.1, gt=0, le=100, description=(
        "dpo, kto: how far the trained model may move from the reference (the base with the adapter off); higher "
        "stays closer (TRL's beta). orpo: the weight of the odds-ratio term beside the chosen answer's SFT loss "
        "(the paper's lambda; TRL's ORPOConfig beta)."))
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "sft"] = Field(default="sigmoid", description=(
        "dpo: the loss (TRL's DPOConfig loss_type; sigmoid is the original DPO)."))
    label_smoothing: Float = Field(default=0.0, ge=0, lt=0.5, description=(
        "dpo: the share of pairs assumed mislabelled (conservative DPO, robust loss); 0: none."))
    desirable_weight: Float = Field(default=1.0, gt=0, le=100, description=(
        "kto: the loss weight of the answers labelled good (raise it when good answers are rarer than bad ones)."))
    undesirable_weight: Float = Field(default=1.0, gt=0, le=100, description=(
        "kto: the loss weight of the answers labelled bad."))


# grpo.rewards' default: the bundled arithmetic example (ftdeploy/rewards.py's EXAMPLE_SPECS, which a test compares)
EXAMPLE_REWARDS = ("ftdeploy.rewards:format_reward", "ftdeploy.rewards:exact_answer")


class GrpoConfig(_Section):
    rewards: StrList = Field(default_factory=lambda: list(EXAMPLE_REWARDS), min_length=1, description=(
        "grpo: the reward functions, each `module:function` or `path/to/file.py:function` (a file is read from the "
        "working directory). Each is called as TRL's GRPOTrainer calls one: prompts=, completions=, completion_ids= "
        "and every other data column (e.g. answer=) as keyword lists, and returns one number (or None: not "
        "applicable) per completion; the rewards are summed. Default: the bundled arithmetic example (a final "
        "`Answer: <number>` line, and that number equal to the row's `answer`)."))
    num_generations: Int = Field(default=8, ge=2, le=1024, description=(
        "grpo: answers sampled per prompt, scored against each other (the group). The global batch (train.batch_size "
        "x train.gradient_accumulation x processes) counts answers, not prompts, and must be a multiple of it."))
    max_completion_length: Int = Field(default=512, ge=1, le=1 << 20, description=(
        "grpo: most tokens of each sampled answer (an answer cut here is scored as it is). The prompt itself is "
        "bounded by data.max_seq_length."))
    temperature: Float = Field(default=1.0, gt=0, le=10, description=(
        "grpo: sampling temperature of the answers; higher gives a group more varied answers to learn from."))
    beta: Float = Field(default=0.0, ge=0, le=100, description=(
        "grpo: the KL coefficient, how strongly training holds the model to the reference (the base, with the adapter "
        "off); 0 (TRL's default) computes no reference and logs no KL; DeepSeek-R1 used 0.001."))


class ExportConfig(_Section):
    quant: StrList = Field(default_factory=lambda: ["auto"], description=(
        "llama.cpp quantization types; the first that passes the quant gate (verify.min_fidelity) is served, the "
        "others are registered under their own tags. `auto`: measure the export.auto_quants types, smallest first, "
        "and serve the first that passes (the unquantized outtype when none does)."))
    auto_quants: StrList = Field(default_factory=lambda: ["q4_k_m", "q5_k_m", "q6_k", "q8_0"], description=(
        "The types `quant: auto` measures with the quant gate, tried smallest first."))
    outtype: Literal["f16", "bf16", "f32"] = Field(default="f16", description=(
        "Type of the unquantized GGUF the quants are made from."))
    deploy: Literal["full", "adapter"] = Field(default="full", description=(
        "full: register the merged model; adapter: register the base once and each tune as a LoRA adapter on it "
        "(Ollama ADAPTER), uploading megabytes per tune."))
    base_name: Str | None = Field(default=None, description=(
        "Ollama name of the base model for deploy=adapter (default: ftdeploy-base-<base>:<quant>)."))


class ModelfileConfig(_Section):
    system: Str | None = Field(default=None, description=(
        "SYSTEM in the Modelfile (default: data.system_prompt, else the chat template's own default)."))
    parameters: AnyMapping = Field(default_factory=dict, description=(
        "Ollama parameters for the Modelfile (e.g. {temperature: 0.7, top_p: 0.9, num_ctx: 8192}), each checked "
        "against Ollama 0.17.4's names and value types; they win over the base's generation-config sampling "
        "defaults and over num_ctx from training (the longest trained sequence, at least data.max_seq_length, "
        "rounded up to a multiple of 256, at most the base's context length); a stop adds to the template's stops."))


class OllamaConfig(_Section):
    host: Str | None = Field(default=None, description=(
        f"Ollama server URL; default $OLLAMA_HOST, else {DEFAULT_OLLAMA_HOST}."))
    start_local: Bool = Field(default=True, description=(
        "When no server answers at the default address, start the pinned local build on loopback."))
    connect_timeout: Float = Field(default=OLLAMA_CONNECT_TIMEOUT, gt=0, lt=1e6, description=(
        "Seconds to wait for the connection to the Ollama server (TCP connect, and the TLS handshake with https); a "
        "host not connected in this time cannot be reached."))
    timeout: Float = Field(default=OLLAMA_TIMEOUT, gt=0, lt=1e6, description=(
        "Seconds an ordinary Ollama call (version, blob check, show, list, copy, delete) waits for the server's answer "
        "once connected; a server that accepted the connection and says nothing for this long has stopped answering, "
        "and the call fails."))
    long_timeout: Float = Field(default=OLLAMA_LONG_TIMEOUT, gt=0, lt=1e6, description=(
        "Seconds the slow Ollama calls (blob upload, create, push, generate and chat, which may load the model first) "
        "wait for the server's next bytes. It bounds each silence, not the whole call: a progress stream runs on while "
        "lines keep coming, and an upload fails when the server stops taking it for this long."))
    headers: AnyMapping = Field(default_factory=dict, description=(
        "Extra HTTP headers for every request, e.g. {Authorization: 'Bearer ${OLLAMA_TOKEN}'} for a reverse proxy; "
        "${VAR} is read from the environment when sent and never written to the run directory."))
    ca_cert: Str | None = Field(default=None, description=(
        "CA bundle (PEM) that signs an https Ollama host's certificate (default: the system's)."))
    insecure_tls: Bool = Field(default=False, description="Do not verify the https host's certificate (testing only).")


class VerifyConfig(_Section):
    min_agreement: Float = Field(default=0.7, ge=0, le=1, description=(
        "The default gate, per served quant: least share of greedy steps at which it picks the merged 16-bit model's "
        "token (the stop counted as one), counted along each eval answer up to its first difference."))
    min_score: Float = Field(default=0.8, ge=0, le=1, description=(
        "Least share of the eval rows carrying `expect` whose expected answer must come back (rows without `expect` "
        "are scored against their reference, not gated)."))
    min_chrf: Float | None = Field(default=None, ge=0, le=100, description=(
        "Least chrF (0-100) of the served answers against the eval references; not gated unless set."))
    max_tokens: Int = Field(default=0, ge=0, description=(
        "Generation limit per eval answer; 0: 1.5 x the longest eval reference in tokens, plus 8."))
    limit: Int = Field(default=0, ge=0, description="At most this many eval prompts (0: all).")
    train_prompts: Int = Field(default=8, ge=1, le=32, description=(
        "With no eval rows: how many training prompts (a sample, fixed by train.seed) the served model is compared "
        "with the merged model on; the data stage keeps a sample of 32 for it."))
    min_fidelity: Float = Field(default=0.85, ge=0, le=1, description=(
        "Quant gate: least top-1 token agreement of a quant with its F16 on the eval chats; below it a quant is "
        "flagged and never served by default."))
    compare: Bool = Field(default=True, description=(
        "Also answer the eval and general-knowledge prompts with the base model (transformers): the report's base "
        "column and the forgetting check."))


class Config(_Section):
    name: Str = Field(default="ftdeploy-demo", description="Run name; also the Ollama model name.")
    base_model: Str = Field(default=DEMO_BASE_MODEL, description=(
        "Hub id, local HF directory, .gguf file, or 'smollm2-135m-instruct' (embedded)."))
    runs_dir: Str = Field(default="runs", description="Where run directories live.")
    base_revision: Str | None = Field(default=None, description=(
        "Hub revision (branch, tag or commit) of base_model; the commit used is recorded."))
    trust_remote_code: Bool = Field(default=False, description=(
        "Allow model code from the hub (off unless asked for; the commit is recorded)."))
    from_run: Str | None = Field(default=None, description=(
        "An earlier run (its name, in runs_dir) whose merged model this run trains instead of base_model: SFT, then "
        "DPO on the SFT model, as two commands. The earlier run's merge is part of this run's fingerprint, so a rerun "
        "that changed it trains this one again."))
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    modelfile: ModelfileConfig = Field(default_factory=ModelfileConfig)
    ollama: OllamaConfig = Field(default_factory=OllamaConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    # Where each given key's value came from (a flag, a file and key, a --set item), for messages; not a config key,
    # never written, not compared.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def origins(self) -> dict[str, str]:
        return self._origins

    @origins.setter
    def origins(self, value: dict[str, str]) -> None:
        self._origins = value

    def __eq__(self, other: object) -> bool:
        # the keys' values only, not where they came from
        return self.__dict__ == other.__dict__ if isinstance(other, Config) else NotImplemented

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def given_as(self, key: str) -> str:
        """A (dotted) key and its value as the user gave it, for a message: `--base-model X` when a flag set it,
        `base_model X [from my.yaml, key base_model]` when a file or --set did, `base_model X` for a default."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        origin = self.origins.get(key)
        if origin is None:
            return f"{key} {value}"
        if origin.startswith("--") and not origin.startswith("--set "):
            return f"{origin} {value}"
        return f"{key} {value} [from {origin}]"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# ---------------------------------------------------------------- pydantic's findings, in ftdeploy's words


def _section(info: FieldInfo) -> type[_Section] | None:
    tp = info.annotation
    return tp if isinstance(tp, type) and issubclass(tp, _Section) else None


def _elsewhere(name: str, model: type[_Section]) -> list[str]:
    """The top-level sections other than `model` that have a key `name` (`ollama.parameters` -> modelfile.parameters,
    as peer tools and issues call Ollama's settings)."""
    found = []
    for section, info in Config.model_fields.items():
        inner = _section(info)
        if inner is not None and inner is not model and name in inner.model_fields:
            found.append(f"{section}.{name}")
    return found


def _scalar(tp: Any) -> Any:
    """The type under `X | None` and Annotated[X, ...]: float for `Float | None`, the Literal for a Literal."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, Annotated):
        return _scalar(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def _bounds(info: FieldInfo) -> str | None:
    """A number key's range as the help and the messages write it: `in [0, 1)`, `>= 1`, or None."""
    b = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    low = f"[{num(b['ge'])}" if "ge" in b else f"({num(b['gt'])}" if "gt" in b else None
    high = f"{num(b['le'])}]" if "le" in b else f"{num(b['lt'])})" if "lt" in b else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if 'ge' in b else '>'} {low[1:]}"
    return f"{'<=' if 'le' in b else '<'} {high[:-1]}" if high else None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
             "bool_type": "true or false"}


@dataclass
class _Problem:
    order: list[tuple[int, int]]  # unknown keys first at each level, then the keys as declared
    path: tuple[Any, ...]  # the key (up to the section or field) that is left out for the checks across keys
    message: str
    wrong_type: bool = False  # the field keeps its default for the checks across keys
    kept: tuple[Any, ...] = ()  # (value,): out of range, kept for the checks across keys, as it was before pydantic


def _problem(err: ErrorDetails, raw: dict[str, Any]) -> _Problem:
    """One pydantic error as ftdeploy words it (`lora.r: must be in [1, 4096], got 0`), with where it sorts."""
    model: type[_Section] = Config
    node: Any = raw
    order: list[tuple[int, int]] = []
    path: list[Any] = []
    where = ""
    info: FieldInfo | None = None
    in_list = False  # inside an item of a list of sections (data.sources): the problem leaves the whole list out
    for part in err["loc"]:
        if info is not None and isinstance(part, str):  # a member of a union (auto or a value): _wording names both
            break
        if info is not None:  # an item of a list
            order.append((1, int(part)))
            where += f"[{part}]"
            if (item := _item_section(info)) is not None:  # its keys follow
                model, info, where, in_list = item, None, where + ".", True
                node = node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else {}
            continue
        fields = list(model.model_fields)
        if not in_list:
            path.append(part)
        if part not in fields:
            order.append((0, list(node).index(part) if isinstance(node, dict) and part in node else 0))
            close = sorted(k for k in fields if k.startswith(str(part)[:3])) or _elsewhere(str(part), model)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return _Problem(order, tuple(path), f"{where}{part}: unknown key{hint}")
        order.append((1, fields.index(str(part))))
        where += str(part)
        info = model.model_fields[str(part)]
        if (section := _section(info)) is not None:
            model, node, info, where = section, node.get(part), None, where + "."
        elif _item_section(info) is not None:
            node = node.get(part) if isinstance(node, dict) else None
    problem = _Problem(order, tuple(path), *_wording(err, where.rstrip("."), info, model))
    if in_list:  # the list keeps its default for the checks across keys, whatever the item's problem
        problem.wrong_type, problem.kept = True, ()
    return problem


def _item_section(info: FieldInfo) -> type[_Section] | None:
    """The section each item of a list key is (data.sources'), or None."""
    if typing.get_origin(info.annotation) is not list:
        return None
    item = _scalar(typing.get_args(info.annotation)[0])
    return item if isinstance(item, type) and issubclass(item, _Section) else None


def _wording(err: ErrorDetails, where: str, info: FieldInfo | None, model: type[_Section]) -> tuple[Any, ...]:
    """(message, wrong_type, kept) for an error at the key `where` (`info`: its field; None: a whole section)."""
    kind, value = err["type"], err["input"]
    if info is None:
        return f"{where}: expected a mapping of {model.__name__} keys, got {value!r}", True
    if (either := _either(info)) is not None:
        return f"{where}: must be {either}, got {value!r}", True
    tp = _scalar(info.annotation)
    if kind in _RANGE_ERRORS:
        value = float(value) if tp is float else value
        return f"{where}: must be {_bounds(info) or 'a finite number'}, got {value}", False, (value,)
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {value!r}", True
    if kind == "literal_error":
        return f"{where}: must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}", True
    if kind == "missing":
        return f"{where}: required", True
    if kind in ("list_type", "dict_type"):
        what = "a list" if kind == "list_type" else "a mapping"
        return f"{where}: expected {what}, got {type(value).__name__} {value!r}", True
    return f"{where}: {err['msg']}", True


def _either(info: FieldInfo) -> str | None:
    """What a key of a word or a value takes (`auto or an integer >= 1`), or None for any other key."""
    if typing.get_origin(info.annotation) not in (typing.Union, types.UnionType):
        return None
    members = [m for m in typing.get_args(info.annotation) if m is not type(None)]
    words = [w for m in members if typing.get_origin(m) is Literal for w in typing.get_args(m)]
    if not words:
        return None
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    values = [kinds.get(_scalar(m), "a value") + (f" {bounds}" if (bounds := _bounds(FieldInfo.from_annotation(m)))
                                                  else "")
              for m in members if typing.get_origin(m) is not Literal]
    return " or ".join([", ".join(map(str, words)), *values])


def build(raw: dict[str, Any]) -> tuple[Config, list[str], set[str]]:
    """The Config of `raw`, every problem found with its keys (in the order of the keys, unknown keys first at each
    level), and the keys whose value has the wrong type. With problems, the Config is still built, for the checks
    across keys: each unknown key and value of the wrong type left out (a wrong type keeps the default), and a
    value out of range kept."""
    try:
        return Config.model_validate(raw), [], set()
    except ValidationError as exc:
        found = sorted((_problem(err, raw) for err in exc.errors()), key=lambda p: p.order)
    problems = list({p.message: p for p in found}.values())  # a union's members each report the same problem
    usable = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for p in problems:
        (usable[p.path[0]] if len(p.path) > 1 else usable).pop(p.path[-1], None)
    try:
        cfg = Config.model_validate(usable)
    except ValidationError:  # not expected: every problem's key is left out
        cfg = Config()
    for p in problems:
        if p.kept:
            setattr(getattr(cfg, p.path[0]) if len(p.path) > 1 else cfg, p.path[-1], p.kept[0])
    return cfg, [p.message for p in problems], {".".join(map(str, p.path)) for p in problems if p.wrong_type}


def describe_keys(cls: type[_Section] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `ftdeploy config --keys` and the docs."""
    rows: list[tuple[str, str, str]] = []
    for name, info in cls.model_fields.items():
        if (section := _section(info)) is not None:
            rows.extend(describe_keys(section, f"{prefix}{name}."))
            continue
        bounds = _bounds(info)
        text = (info.description or "") + (f" Must be {bounds}." if bounds else "")
        default = "(required)" if info.is_required() else repr(info.get_default(call_default_factory=True))
        rows.append((prefix + name, default, text))
        if (item := _item_section(info)) is not None:  # each item's keys: data.sources[].path, ...
            rows.extend(describe_keys(item, f"{prefix}{name}[]."))
    return rows
