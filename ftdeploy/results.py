"""What each stage returns, typed. The manifest stores them as JSON (`to_dict`); whoever reads one back (a
skipped stage, the next stage, the report, `--json`) rebuilds it with `from_dict`, which ignores keys it does not
know, so a manifest written by an older ftdeploy still reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

R = TypeVar("R", bound="Result")


@dataclass
class Result:
    # Fields holding typed values, rebuilt by from_dict: {field: (Result subclass, "one" | "list")}.
    nested: ClassVar[dict[str, tuple[type[Result], str]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any] | None) -> R:
        data = data or {}
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name, (kind, shape) in cls.nested.items():
            value = values.get(name)
            if isinstance(value, dict) and shape == "one":
                values[name] = kind.from_dict(value)
            elif isinstance(value, list) and shape == "list":
                values[name] = [kind.from_dict(v) if isinstance(v, dict) else v for v in value]
        return cls(**values)


@dataclass
class DataResult(Result):
    rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    trained_tokens: int = 0
    chat_format: str = ""
    pad_token: str | None = None
    eos_token: str | None = None


@dataclass
class TrainResult(Result):
    engine: str = ""
    device: str = ""
    steps: int = 0
    train_loss: float | None = None
    final_loss: float | None = None
    seconds: float = 0.0
    optim: str = ""
    world_size: int = 1
    strategy: str | None = None
    per_device_batch: int = 0
    gradient_accumulation: int = 0
    global_batch: int = 0
    examples_per_s: float = 0.0
    dataset_trained_tokens: int = 0
    resumed_from: str | None = None
    worker_node: bool = False  # a node > 0 of a multi-node run: it trained its share, node 0 wrote the adapter
    node_rank: int = 0


@dataclass
class MergeResult(Result):
    merged_dir: str = ""


@dataclass
class ExportResult(Result):
    gguf: dict[str, str] = field(default_factory=dict)  # quant -> file
    served: str = ""  # the quant registered under the model's own name (the first that passes the gate)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)  # quant -> top1_agreement, ppl_ratio, ...
    flagged: list[str] = field(default_factory=list)  # below the gate: registered under their own tag only
    min_fidelity: float = 0.0
    auto: bool = False  # --quant auto: the types tried are the keys of `fidelity`, in order; only `served` is kept
    quant_note: str = ""  # how the served quant was chosen, in a sentence (the report's)
    gate_prompts: str = ""  # what the quant gate measured on: "eval" or "train" conversations ("" when nothing)
    base_gguf: str | None = None  # deploy=adapter: the base model's GGUF, shared by every tune of it
    base_name: str | None = None
    base_bytes: int | None = None
    adapter_bytes: int | None = None


@dataclass
class ModelfileResult(Result):
    path: str = ""
    chat_format: str = ""
    stops: list[str] = field(default_factory=list)
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class TagResult(Result):
    quant: str = ""
    digest: str = ""
    uploaded_bytes: int = 0


@dataclass
class RegisterResult(Result):
    model: str = ""
    digest: str = ""
    uploaded_bytes: int = 0
    host: str = ""
    server_version: str = ""
    deploy: Literal["full", "adapter"] = "full"
    size: int | None = None
    tags: dict[str, TagResult] = field(default_factory=dict)  # other quants, each under its own tag
    # deploy=adapter
    base_model: str | None = None
    base_created: bool | None = None
    base_uploaded_bytes: int | None = None
    adapter_bytes: int | None = None
    full_model_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RegisterResult:
        result = super().from_dict(data)
        result.tags = {k: v if isinstance(v, TagResult) else TagResult.from_dict(v) for k, v in result.tags.items()}
        return result


@dataclass
class Answer(Result):
    prompt: str = ""
    expected: str = ""
    answer: str = ""
    ok: bool = False
    done_reason: str = ""
    gated: bool = False  # the row carries `expect`: its match counts toward verify.min_score


@dataclass
class ParityMismatch(Result):
    chat: list[dict[str, str]] = field(default_factory=list)
    raw: str = ""
    chat_answer: str = ""


@dataclass
class TemplateParity(Result):
    nested = {"mismatches": (ParityMismatch, "list")}
    checked: int = 0
    mismatches: list[ParityMismatch] = field(default_factory=list)
    passed: bool = True


@dataclass
class ForgettingItem(Result):
    prompt: str = ""
    expect: str = ""
    base: str = ""
    tuned: str = ""


@dataclass
class Forgetting(Result):
    nested = {"items": (ForgettingItem, "list")}
    prompts: int = 0
    base_correct: int = 0
    tuned_correct: int = 0
    broken: int = 0
    changed: int = 0
    items: list[ForgettingItem] = field(default_factory=list)


ModelRole = Literal["base", "merged", "served", "tag"]


@dataclass
class PromptAgreement(Result):
    """One eval prompt: how far a served quant's greedy answer follows the merged model's, in the merged
    tokenizer's tokens. The stop counts as one more token of an answer that stopped."""

    prefix: int = 0  # tokens both answers share from the start (the stop included)
    length: int = 0  # tokens of the merged answer (the stop included)
    ratio: float = 0.0  # prefix / length
    merged_stopped: bool = False
    served_stopped: bool = False


@dataclass
class ModelScore(Result):
    """One model's answers to the eval prompts: the base and merged checkpoints through transformers, the served
    quant and every other tag through Ollama."""

    nested = {"prompts": (PromptAgreement, "list")}
    role: ModelRole = "served"
    label: str = ""  # as shown in the report
    quant: str | None = None
    tag: str | None = None  # the Ollama name it is served under
    hits: int = 0
    total: int = 0
    match: float = 0.0
    agreement: float | None = None  # replies equal to the merged model's (None for the merged model itself)
    top1_agreement: float | None = None  # quants: top-1 token agreement with the unquantized GGUF
    ppl_ratio: float | None = None
    replies: list[str] = field(default_factory=list)
    chrf: float | None = None  # corpus chrF (sacrebleu, 0-100) of the replies against the eval references
    stopped: int = 0  # answers that ended on a stop token within the limit
    # Served quants: greedy agreement with the merged model (fidelity.agreement_scores): the share of greedy steps
    # that picked the merged model's token up to each answer's first difference (the gate), the mean share of the
    # merged answer repeated from its start, and the share of prompts where both stopped or both ran on.
    token_agreement: float | None = None
    prefix_share: float | None = None
    stop_agreement: float | None = None
    gated: bool = False  # token_agreement is gated for this one (not for a quant export already flagged)
    passed: bool | None = None  # the gate's verdict (None: not gated)
    prompts: list[PromptAgreement] = field(default_factory=list)


@dataclass
class VerifyFailure(Result):
    """A check verify failed: which, for which model, and one example."""

    check: str = ""  # template_parity | agreement | stops | expected_answers | chrf | no_prompts
    model: str = ""  # the Ollama name
    quant: str | None = None
    message: str = ""
    example: str = ""


@dataclass
class VerifySummary(Result):
    nested = {"answers": (Answer, "list"), "template_parity": (TemplateParity, "one"),
              "forgetting": (Forgetting, "one"), "models": (ModelScore, "list"), "failures": (VerifyFailure, "list")}
    hits: int = 0
    total: int = 0
    score: float = 0.0
    min_score: float = 0.0
    passed: bool = False
    stopped: int = 0
    answers: list[Answer] = field(default_factory=list)
    template_parity: TemplateParity | None = None
    forgetting: Forgetting | None = None
    models: list[ModelScore] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # the eval rows' reference answers
    expect_rows: int | None = None  # rows carrying `expect`, the only ones min_score gates (None: an older ftdeploy
    # wrote this, and gated every row)
    expect_hits: int = 0
    max_tokens: int = 0  # the generation limit used (from the references' lengths unless verify.max_tokens is set)
    min_agreement: float = 0.0
    min_chrf: float | None = None
    # Where the prompts came from: "eval" rows (references scored), or "train": a sample of the training prompts,
    # asked when the data has no eval rows (served vs merged only; reference scoring needs eval rows).
    prompt_source: Literal["eval", "train"] = "eval"
    # Raw-text data (the `text` layout, plain-string prompt/completion rows) has no chats: the prompts are prefixes of
    # sampled training texts, continued through /api/generate raw (no TEMPLATE, no SYSTEM, no template parity).
    raw: bool = False
    system: str | None = None  # the Modelfile's SYSTEM, part of every prompt built for the merged model and parity
    failures: list[VerifyFailure] = field(default_factory=list)
    unverified: dict[str, str] = field(default_factory=dict)  # failed name -> the name it was moved to
    seconds: dict[str, float] = field(default_factory=dict)  # where verify spent its time

    def model(self, role: ModelRole) -> ModelScore | None:
        return next((m for m in self.models if m.role == role), None)


RESULT_TYPES: dict[str, type[Result]] = {
    "data": DataResult, "train": TrainResult, "merge": MergeResult, "export": ExportResult,
    "modelfile": ModelfileResult, "register": RegisterResult, "verify": VerifySummary,
}
