"""What each stage returns, typed. The manifest stores them as JSON (`to_dict`); whoever reads one back (a
skipped stage, the next stage, the report, `--json`) rebuilds it with `from_dict`, which ignores keys it does not
know, so a manifest written by an older ftdeploy still reads.

Each is a pydantic model: a nested result is rebuilt from its annotation. Fields are checked when a result is built
(an int given for a float becomes a float), not when one is set afterwards, as a stage fills its result in."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, Field


class Result(BaseModel):
    """A stage's result. from_dict ignores keys the model does not declare (pydantic's default, extra="ignore")."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        return cls.model_validate(data or {})


class SourceMix(Result):
    """One source of a mix (data.sources) as the data stage drew it (data/mix.py's SourceCount)."""

    path: str = ""
    layout: str = ""
    revision: str | None = None  # the commit read, for a Hugging Face dataset
    rows: int = 0  # usable rows read
    bad_rows: int = 0
    eval_rows: int = 0  # taken for eval: held out of it, or its eval_path's rows
    kept: int = 0  # rows it gave the mix, repeats counted
    share: float = 0.0  # of the mix's rows
    weight: float | None = None
    max_rows: int | None = None


class DataResult(Result):
    rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    trained_tokens: int = 0
    chat_format: str = ""
    pad_token: str | None = None
    eos_token: str | None = None
    sources: list[SourceMix] = Field(default_factory=list)  # a mix: each source's rows read and kept, and share
    revisions: dict[str, str] = Field(default_factory=dict)  # {Hugging Face dataset id: the commit read}


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
    method: str = "sft"  # train.method: sft, dpo, orpo or kto
    final_margin: float | None = None  # dpo, orpo, kto: the last logged reward margin (chosen - rejected)
    final_accuracy: float | None = None  # dpo, orpo: the last logged share of pairs whose chosen reward is the higher
    final_reward: float | None = None  # grpo: the last logged mean reward of the sampled answers
    tracker: str | None = None  # train.report_to when it was not none: tensorboard, wandb or mlflow
    tracker_run: str | None = None  # where the tracker's run is: TensorBoard's event folder, the run's URL, ...
    gradient_checkpointing: str = ""  # off, on (recomputation) or unsloth (offloaded): train.gradient_checkpointing's
    packing: str = ""  # how rows made batches: padded, padding-free or packed (data.packing, after the attention check)
    attention: str = ""  # the attention implementation trained with (sdpa, eager, flash_attention_2, ...)


class LossPoint(Result):
    """One logged training step."""

    step: int = 0
    loss: float = 0.0
    lr: float = 0.0
    elapsed_s: float = 0.0  # 0.0 for the steps before a resume (read from the checkpoint)


class PreferencePoint(Result):
    """One logged step of a preference run (dpo, orpo, kto), as TRL logs it: the implicit rewards (beta x the
    log-ratio of the trained model to the reference; orpo, which has no reference: beta x the mean log-probability
    per answer token) of the chosen and rejected answers, their margin, the share of pairs whose chosen reward is the
    higher (dpo and orpo) and KTO's KL estimate; ORPO's log odds ratio (log odds of the chosen answer minus that of
    the rejected, per token: above 0, the chosen is the likelier) and its SFT loss on the chosen answers. None: not
    logged at that step (a KTO batch with no rejected answer has no margin)."""

    step: int = 0
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    margin: float | None = None
    accuracy: float | None = None
    kl: float | None = None
    log_odds_ratio: float | None = None  # orpo: TRL logs it as log_odds_chosen (its log_odds_ratio: the log-sigmoid)
    nll_loss: float | None = None  # orpo: the cross-entropy on the chosen answers' tokens


class RewardPoint(Result):
    """One logged step of a GRPO run, as TRL's GRPOTrainer logs it: the mean reward of the step's sampled answers
    (each answer's rewards summed over the functions) and its standard deviation, each reward function's mean (None:
    it scored none of the answers) by its name, and the KL to the reference (logged with grpo.beta above 0 only)."""

    step: int = 0
    reward: float | None = None
    reward_std: float | None = None
    functions: dict[str, float | None] = Field(default_factory=dict)
    kl: float | None = None


class TrainMetrics(Result):
    """What training returns (stages.train.fit; a launched group's rank 0 through distributed.train) and the
    manifest keeps as metrics.train: TrainResult's figures, in this order, with the loss history. A node > 0 of a
    multi-node run returns only its world_size. The defaults are TrainResult's."""

    engine: str = ""
    device: str = ""
    steps: int = 0
    train_loss: float | None = None
    final_loss: float | None = None
    seconds: float = 0.0
    loss_history: list[LossPoint] = Field(default_factory=list)
    optim: str = ""
    world_size: int = 1
    strategy: str | None = None
    per_device_batch: int = 0
    gradient_accumulation: int = 0
    global_batch: int = 0
    examples_per_s: float = 0.0
    dataset_trained_tokens: int = 0
    resumed_from: str | None = None
    method: str = "sft"
    final_margin: float | None = None
    final_accuracy: float | None = None
    preference_history: list[PreferencePoint] = Field(default_factory=list)  # dpo, orpo, kto: a point a logged step
    reward_history: list[RewardPoint] = Field(default_factory=list)  # grpo: a point a logged step
    final_reward: float | None = None  # grpo: the last logged mean reward
    tracker: str | None = None
    tracker_run: str | None = None
    gradient_checkpointing: str = ""
    packing: str = ""
    attention: str = ""
    plan: str = ""  # how the batch and checkpointing were chosen, the line training logged


class MergeResult(Result):
    merged_dir: str = ""


class ExportResult(Result):
    gguf: dict[str, str] = Field(default_factory=dict)  # quant -> file
    served: str = ""  # the quant registered under the model's own name (the first that passes the gate)
    # quant -> top1_agreement, ppl_ratio, ... and `tokens`, an int (kept one: a float annotation would make it 278.0)
    fidelity: dict[str, dict[str, float | int]] = Field(default_factory=dict)
    flagged: list[str] = Field(default_factory=list)  # below the gate: registered under their own tag only
    min_fidelity: float = 0.0
    auto: bool = False  # --quant auto: the types tried are the keys of `fidelity`, in order; only `served` is kept
    quant_note: str = ""  # how the served quant was chosen, in a sentence (the report's)
    gate_prompts: str = ""  # what the quant gate measured on: "eval" or "train" conversations ("" when nothing)
    base_gguf: str | None = None  # deploy=adapter: the base model's GGUF, shared by every tune of it
    base_name: str | None = None
    base_bytes: int | None = None
    adapter_bytes: int | None = None


class ModelfileResult(Result):
    path: str = ""
    chat_format: str = ""
    stops: list[str] = Field(default_factory=list)
    system: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    context: str = ""  # where num_ctx came from, in a sentence: the trained context, or modelfile.parameters


class TagResult(Result):
    quant: str = ""
    digest: str = ""
    uploaded_bytes: int = 0


class RegisterResult(Result):
    model: str = ""
    digest: str = ""
    uploaded_bytes: int = 0
    host: str = ""
    server_version: str = ""
    deploy: Literal["full", "adapter"] = "full"
    size: int | None = None
    tags: dict[str, TagResult] = Field(default_factory=dict)  # other quants, each under its own tag
    # deploy=adapter
    base_model: str | None = None
    base_created: bool | None = None
    base_uploaded_bytes: int | None = None
    adapter_bytes: int | None = None
    full_model_bytes: int | None = None


class Answer(Result):
    prompt: str = ""
    expected: str = ""
    answer: str = ""
    ok: bool = False
    done_reason: str | None = ""  # None: the server gave none (ollama's ChatResponse.done_reason is Optional)
    gated: bool = False  # the row carries `expect`: its match counts toward verify.min_score


class ParityMismatch(Result):
    chat: list[dict[str, Any]] = Field(default_factory=list)  # a tool probe's messages carry tool_calls
    raw: str = ""
    chat_answer: str = ""


class TemplateParity(Result):
    checked: int = 0
    mismatches: list[ParityMismatch] = Field(default_factory=list)
    passed: bool = True


class ForgettingItem(Result):
    prompt: str = ""
    expect: str = ""
    base: str = ""
    tuned: str = ""


class Forgetting(Result):
    prompts: int = 0
    base_correct: int = 0
    tuned_correct: int = 0
    broken: int = 0
    changed: int = 0
    items: list[ForgettingItem] = Field(default_factory=list)


ModelRole = Literal["base", "merged", "served", "tag"]


class PromptAgreement(Result):
    """One eval prompt: how far a served quant's greedy answer follows the merged model's, in the merged
    tokenizer's tokens. The stop counts as one more token of an answer that stopped."""

    prefix: int = 0  # tokens both answers share from the start (the stop included)
    length: int = 0  # tokens of the merged answer (the stop included)
    ratio: float = 0.0  # prefix / length
    merged_stopped: bool = False
    served_stopped: bool = False


class ModelScore(Result):
    """One model's answers to the eval prompts: the base and merged checkpoints through transformers, the served
    quant and every other tag through Ollama."""

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
    replies: list[str] = Field(default_factory=list)
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
    prompts: list[PromptAgreement] = Field(default_factory=list)


class VerifyFailure(Result):
    """A check verify failed: which, for which model, and one example."""

    check: str = ""  # template_parity | agreement | stops | expected_answers | chrf | no_prompts
    model: str = ""  # the Ollama name
    quant: str | None = None
    message: str = ""
    example: str = ""


class PairScore(Result):
    """One preference pair, as verify saw it: the merged model's (and the base's) log-probability margin, chosen minus
    rejected; at the first token where the two answers differ, which of the two the merged and the served model put
    first (None: the served model ranked neither in its top 20)."""

    prompt: str = ""
    merged_margin: float = 0.0
    base_margin: float | None = None
    merged_first: bool | None = None
    served_first: bool | None = None


class PreferenceCheck(Result):
    """verify on preference data (train.method dpo or kto). DPO pairs: accuracy is the share of pairs whose margin is
    positive; `agreement` the share of pairs where the served model's choice at the first differing token is the
    merged model's, gated by verify.min_agreement. KTO rows (one labelled answer each): the margin is the mean change
    from the base in log-probability of the good answers minus that of the bad ones."""

    method: str = "dpo"
    pairs: int = 0
    merged_accuracy: float | None = None
    merged_margin: float | None = None
    base_accuracy: float | None = None
    base_margin: float | None = None
    served_accuracy: float | None = None  # first differing token, through Ollama's top_logprobs
    agreement: float | None = None
    items: list[PairScore] = Field(default_factory=list)


class RewardScore(Result):
    """One reward function's mean over the eval prompts' greedy answers, for each model (None: not asked, or the
    function scored none of its answers: None is its 'not applicable')."""

    name: str = ""
    served: float | None = None
    merged: float | None = None
    base: float | None = None
    scored: int = 0  # the served model's answers it scored (not None)


class RewardItem(Result):
    """One eval prompt: each model's greedy answer, and the served answer's reward by function."""

    prompt: str = ""
    served: str = ""
    merged: str | None = None
    base: str | None = None
    rewards: dict[str, float | None] = Field(default_factory=dict)


class RewardCheck(Result):
    """verify on a GRPO run: the reward functions (grpo.rewards, called as training calls them) on greedy answers to
    the eval prompts, from the served model (Ollama), the merged model and the base (transformers). `served`,
    `merged`, `base`: the mean reward, each answer's rewards summed over the functions as GRPO sums them (an answer
    every function scored None left out)."""

    prompts: int = 0
    max_tokens: int = 0
    served: float | None = None
    merged: float | None = None
    base: float | None = None
    functions: list[RewardScore] = Field(default_factory=list)
    items: list[RewardItem] = Field(default_factory=list)


class VerifySummary(Result):
    hits: int = 0
    total: int = 0
    score: float = 0.0
    min_score: float = 0.0
    passed: bool = False
    stopped: int = 0
    answers: list[Answer] = Field(default_factory=list)
    template_parity: TemplateParity | None = None
    forgetting: Forgetting | None = None
    models: list[ModelScore] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    references: list[str] = Field(default_factory=list)  # the eval rows' reference answers
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
    failures: list[VerifyFailure] = Field(default_factory=list)
    unverified: dict[str, str] = Field(default_factory=dict)  # failed name -> the name it was moved to
    seconds: dict[str, float] = Field(default_factory=dict)  # where verify spent its time
    preference: PreferenceCheck | None = None  # preference runs only
    rewards: RewardCheck | None = None  # grpo runs only

    def model(self, role: ModelRole) -> ModelScore | None:
        return next((m for m in self.models if m.role == role), None)


RESULT_TYPES: dict[str, type[Result]] = {
    "data": DataResult, "train": TrainResult, "merge": MergeResult, "export": ExportResult,
    "modelfile": ModelfileResult, "register": RegisterResult, "verify": VerifySummary,
}
