"""The verify stage on a run: which prompts to ask (eval rows, or a sample of the training prompts, or raw-text
continuations), the library's comparison (stages/verify.py), and the verdict: a model that fails is moved to
`<name>-unverified`, so nothing that failed answers under the name a user runs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StageMissingError
from ..ollama import OllamaClient
from ..results import ExportResult, PreferenceCheck, VerifySummary
from ..runs import atomic_write_text
from .artifacts import load_spec, other_quants, raw_text_data, served_quant, verify_examples
from .context import Context, previous

if TYPE_CHECKING:
    from ..data import Record

log = logging.getLogger(__name__)


def stage_verify(ctx: Context) -> VerifySummary:
    """Is the served model the trained model? Each served quant's greedy answers to the eval prompts (without eval
    rows, a sample of the training prompts) against the merged 16-bit model's (the default gate), the template
    check, the references (eval rows only), and forgetting."""
    from ..stages.verify import Laps, failures, verify_chats, verify_raw

    cfg, name = ctx.cfg, ctx.cfg.name
    lap = Laps()
    examples, source = verify_examples(ctx, cfg.verify.limit)
    system = load_spec(ctx).system
    client = ctx.client()
    _require_registered(client, name)
    tags = other_quants(ctx)
    exported = previous(ctx, "export", ExportResult)
    if raw_text_data(ctx, examples, source):  # no chats: raw continuations of training texts
        return _verdict(ctx, verify_raw(client, name, tags, served_quant(ctx), ctx.run.merged_dir, examples,
                                        cfg.verify, cfg.train.seed, exported), tags)
    if not examples:
        summary = VerifySummary(min_score=cfg.verify.min_score, min_agreement=cfg.verify.min_agreement,
                                prompt_source=source, system=system)
        return _verdict(ctx, summary, tags)
    if source != "eval":
        log.info("verify: no eval rows; comparing the served model with the merged one on %d training prompts "
                 "(reference scoring needs eval rows: data.eval or data.eval_split)", len(examples))
    pairs = [e for e in examples if e.is_preference()]
    if pairs:  # the chosen answer is the reference the generation limit is sized from (a bad answer is none)
        examples = [dataclasses.replace(e, messages=[*(e.messages or []), *([e.chosen] if e.chosen else [])],
                                        chosen=None, rejected=None) if e.is_preference() else e for e in examples]
    base = ctx.base() if cfg.verify.compare else None
    settings = cfg.verify
    if cfg.train.method == "grpo" and not settings.max_tokens:  # answers as long as training let them run
        settings = settings.model_copy(update={"max_tokens": cfg.grpo.max_completion_length})
    summary = verify_chats(client, name, tags, served_quant(ctx), exported, ctx.run.merged_dir, base, examples,
                           source == "eval", system, settings, cfg.train.seed, lap)
    if cfg.train.method == "grpo":  # the reward functions on each model's answers to the same prompts
        from ..rewards import load_rewards
        from ..stages.verify_rewards import score_replies

        replies = {role: m.replies for role in ("served", "merged", "base") if (m := summary.model(role)) is not None}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ctx.run.merged_dir))  # completion_ids, as training gives them
        summary.rewards = score_replies(examples, replies, load_rewards(cfg.grpo.rewards), summary.max_tokens,
                                        lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        lap("rewards")
        summary.seconds = lap.seconds
    if pairs:
        summary.preference = _preference(ctx, pairs, base, system)
        lap("preference")
        summary.seconds = lap.seconds
        summary.failures = failures(summary, name)
    return _verdict(ctx, summary, tags)


def _preference(ctx: Context, pairs: list[Record], base: Path | str | None, system: str | None) -> PreferenceCheck:
    """How the merged and the served model rank the chosen answers over the rejected (stages/verify_pairs.py)."""
    from ..chat_template import mapping_for_template, read_chat_template
    from ..stages.verify_pairs import check_labelled, check_pairs

    chat = read_chat_template(ctx.run.merged_dir)
    mapping = mapping_for_template(chat, f"{ctx.run.merged_dir} chat template")
    if any(e.chosen is None or e.rejected is None for e in pairs):  # KTO's labelled answers: one answer a row
        return check_labelled(pairs, ctx.run.merged_dir, base, system, mapping)
    # Pairs (a KTO run's held-out pairs too): margins, and the served model's choice where the answers first differ
    return check_pairs(ctx.client(), ctx.cfg.name, pairs, ctx.run.merged_dir, base, system, mapping,
                       chat.bos if mapping.format.bos_in_template else None, ctx.cfg.train.seed, ctx.cfg.train.method)


def _verdict(ctx: Context, summary: VerifySummary, tags: dict[str, str]) -> VerifySummary:
    """Record the summary; a model that failed goes to `<name>-unverified`; raise VerifyError naming each failure."""
    from ..stages.verify import check, failures

    name = ctx.cfg.name
    summary.failures = summary.failures or failures(summary, name)
    summary.passed = not summary.failures
    if summary.failures:
        # A failure of the whole model (no prompts, the template) moves every tag; a quant's own, only that tag.
        whole = {f.check for f in summary.failures} & {"no_prompts", "template_parity"}
        failed = {f.model for f in summary.failures}
        moving = [n for n in (name, *tags) if whole or n in failed]
        summary.unverified = _move_unverified(ctx.client(), moving)
    else:
        _forget_unverified(ctx.client(), [name, *tags])
    record = summary.to_dict()
    ctx.run.update(metrics={"verify": record})
    atomic_write_text(ctx.run.path / "verify.json", json.dumps(record, indent=2))
    check(summary, name)
    return summary


def _require_registered(client: OllamaClient, name: str) -> None:
    from ..errors import ModelNotFoundError
    from ..stages.verify import unverified_name

    try:
        client.show(name)
    except ModelNotFoundError:
        raise StageMissingError(
            f"{name}: not on the Ollama server at {client.host}. A model that fails verify is moved to "
            f"{unverified_name(name)}; run `ftdeploy register` (or `ftdeploy train-and-serve`) to register it again"
        ) from None


def _move_unverified(client: OllamaClient, names: list[str]) -> dict[str, str]:
    """Copy each model to its `-unverified` name and delete the original: {original: new name}."""
    from ..stages.verify import unverified_name

    moved = {}
    for name in names:
        client.copy(name, unverified_name(name))
        client.delete(name)
        moved[name] = unverified_name(name)
        log.warning("verify failed: %s moved to %s", name, moved[name])
    return moved


def _forget_unverified(client: OllamaClient, names: list[str]) -> None:
    """A model that passed: drop what an earlier failed verify left under its `-unverified` name."""
    from ..errors import ModelNotFoundError
    from ..stages.verify import unverified_name

    for name in names:
        try:
            client.delete(unverified_name(name))
        except ModelNotFoundError:
            continue
