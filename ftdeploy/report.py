"""runs/<name>/report.md and report.html, rebuilt from the manifest alone (`ftdeploy report RUN`)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from .results import (
    DataResult,
    ExportResult,
    Forgetting,
    ModelScore,
    PreferenceCheck,
    RegisterResult,
    RewardCheck,
    TrainMetrics,
    VerifySummary,
)
from .runs import LOSS_PLOT, MANIFEST_FILE, atomic_write_text, read_manifest

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
_AUTOLINK = re.compile(r"&lt;(https?://[^\s&]+)&gt;")  # a markdown autolink, as html.escape leaves it


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) else "–"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "–"


def _on_training_data(verify: VerifySummary) -> str:
    """The verdict on data without eval rows: what was compared, on what."""
    if verify.raw:
        return (f" was verified on raw continuations of {verify.total} training texts: it and the merged 16-bit "
                "model continued the same prefixes of texts sampled from the training data (raw text: no chats, no "
                "eval rows), sent through /api/generate raw at temperature 0. This checks that the served model is "
                "the trained model, not how well it answers new questions. Template parity does not apply to raw "
                "prompts (they bypass the Modelfile TEMPLATE and SYSTEM) and was not checked")
    return (f" was compared with the merged 16-bit model on {verify.total} prompts sampled from the training "
            "data: the data has no eval rows, so this checks that the served model is the trained model, "
            "not how well it answers new questions (reference scoring needs eval rows: data.eval or "
            "data.eval_split)")


Section = tuple[str, list[str], list[list[str]] | None]  # (title, paragraphs, table rows with a header first)


def sections(manifest: dict[str, Any], run_name: str) -> list[Section]:
    """(title, paragraphs, table rows with a header first) for each section of the report."""
    stages = manifest.get("stages", {})
    metrics = manifest.get("metrics", {})
    verify = VerifySummary.from_dict(metrics.get("verify"))
    export = ExportResult.from_dict(stages.get("export", {}).get("outputs"))
    register = RegisterResult.from_dict(stages.get("register", {}).get("outputs"))
    verdict = (_verdict_paragraphs(verify, run_name) if metrics.get("verify")
               else ["Not verified yet: run `ftdeploy verify`."])
    out: list[Section] = [("Verdict", verdict, None)]
    if export.fidelity or export.quant_note:
        out.append(_quant_section(export))
    if verify.models:
        out.append(_eval_section(verify, export))
        if verify.prompts:
            out.append(_answers_section(verify))
    if verify.preference:
        out.append(_preference_section(verify.preference))
    if verify.rewards:
        out.append(_rewards_section(verify.rewards))
    if verify.forgetting:
        out.append(_forgetting_section(verify.forgetting))
    if (data := DataResult.from_dict(stages.get("data", {}).get("outputs"))).sources:
        out.append(_mix_section(data))
    if metrics.get("train"):
        out.append(_training_section(TrainMetrics.from_dict(metrics["train"])))
    if register.deploy == "adapter":
        out.append(_deploy_section(register, export))
    return out + _record_sections(manifest)


def _verdict_paragraphs(verify: VerifySummary, run_name: str) -> list[str]:
    """The Verdict section's paragraphs for a run verify has recorded."""
    served, merged = verify.model("served"), verify.model("merged")
    ok = verify.passed and (verify.template_parity is None or verify.template_parity.passed)
    agree = served.agreement if served else None
    head = f"**{'PASS' if ok else 'FAIL'}**: the served model `{run_name}`"
    gated_rows = verify.total if verify.expect_rows is None else verify.expect_rows
    on_train = verify.prompt_source == "train"
    if on_train:
        head += _on_training_data(verify)
    elif gated_rows or not verify.total:
        head += (f" answered {verify.hits}/{verify.total} eval prompts as expected (min_score {verify.min_score}"
                 + (f" on the {gated_rows} rows with `expect`)" if gated_rows != verify.total else ")")
                 + (f"; the merged 16-bit model answered {merged.hits}/{merged.total}" if merged else ""))
    else:
        head += (f" was asked {verify.total} eval prompts; no row carries `expect`, so the references are scored "
                 f"(chrF: served {_num(served.chrf if served else None, '{:.1f}')}, merged "
                 f"{_num(merged.chrf if merged else None, '{:.1f}')}), not gated")
    if agree is not None and merged and not on_train:
        head += (f", and the served answers agree with it on {_pct(agree)} of prompts" if gated_rows
                 else f"; {_pct(agree)} of the served answers equal the merged model's word for word")
    verdict = [head + "."]
    if verify.system:
        verdict.append(f"Every prompt carried the Modelfile's SYSTEM ({verify.system[:120]!r}) where it had no "
                       "system message of its own, as Ollama adds it: the merged model's prompts and the "
                       "template check's raw prompts too.")
    quants = [m for m in verify.models if m.role in ("served", "tag") and m.token_agreement is not None]
    if quants:
        def gate(m: ModelScore) -> str:
            return "PASS" if m.passed else "FAIL" if m.passed is False else "not gated: flagged by the quant gate"

        verdict.append(
            f"Served vs merged (the default gate, verify.min_agreement {_pct(verify.min_agreement)} of greedy "
            "steps picking the merged model's token, up to each answer's first difference): "
            + "; ".join(f"`{m.tag}` ({m.quant}) {_pct(m.token_agreement)} {gate(m)}, repeating "
                        f"{_pct(m.prefix_share)} of the merged answers from their start, stops agreeing on "
                        f"{_pct(m.stop_agreement)}" for m in quants)
            + f". Answers were cut at {verify.max_tokens} tokens.")
    parity = verify.template_parity
    if parity:
        verdict.append(f"Template parity: {parity.checked - len(parity.mismatches)}/{parity.checked} probe chats "
                       "answer the same through `/api/chat` as with the training-rendered prompt sent raw.")
    verdict.append(f"Stops: {verify.stopped}/{verify.total} answers ended on a stop token"
                   + (f" (the merged model: {merged.stopped}/{merged.total})." if merged else "."))
    for f in verify.failures:
        verdict.append(f"Failed {f.check}: `{f.model}`" + (f" ({f.quant})" if f.quant else "") + f": {f.message}"
                       + (f" E.g. {f.example}" if f.example else ""))
    if verify.unverified:
        verdict.append("Moved so that no failed model answers under its own name: "
                       + ", ".join(f"`{a}` -> `{b}`" for a, b in verify.unverified.items()) + ".")
    return verdict


def _eval_section(verify: VerifySummary, export: ExportResult) -> Section:
    """Each model's and quant's scores on the prompts, one row each."""
    rows = [["model", "expected answers", "agrees with merged", "top-1 vs F16", "perplexity ratio",
             "steps as merged", "prefix kept", "stops as merged", "chrF"]]
    for m in verify.models:
        expected = "–" if verify.prompt_source == "train" else f"{m.hits}/{m.total} ({_pct(m.match)})"
        rows.append([m.label, expected, _pct(m.agreement),
                     _num(m.top1_agreement), _num(m.ppl_ratio), _pct(m.token_agreement), _pct(m.prefix_share),
                     _pct(m.stop_agreement), _num(m.chrf, "{:.1f}")])
    notes = ["*expected answers*: the expected answer is in the reply at temperature 0. *agrees with merged*: the "
             "reply equals the merged 16-bit model's (case and spacing aside). *top-1 vs F16*: share of positions "
             "where the quant and the F16 GGUF pick the same next token on the eval chats (llama.cpp). *perplexity "
             "ratio*: quant / F16. *steps as merged* (the gate): share of greedy steps where the served model "
             "picked the merged model's token (the stop counted as one), up to each answer's first difference. "
             "*prefix kept*: mean share of the merged answer that the served one repeats from its start. "
             "*stops as merged*: share of "
             "prompts where both stopped, or both ran to the limit. *chrF*: sacrebleu's chrF (0-100) against the "
             "eval references."]
    if export.flagged:
        notes.append(f"Quant gate (min_fidelity {export.min_fidelity}): flagged {', '.join(export.flagged)}; "
                     f"never served by default. Served: {export.served}.")
    return "Eval per model and quant", notes, rows


def _answers_section(verify: VerifySummary) -> Section:
    """Each prompt's answers, model by model, beside the eval reference."""
    prompts, models = verify.prompts, verify.models
    on_train = verify.prompt_source == "train"
    refs = [] if on_train else verify.references or [""] * len(prompts)
    rows = [["prompt", *([] if on_train else ["reference"]), *(m.label for m in models)]]
    for i, prompt in enumerate(prompts):
        cells = []
        for m in models:
            reply = (m.replies or [""] * len(prompts))[i][:80]
            p = m.prompts[i] if i < len(m.prompts) else None
            cells.append(reply + (f" [{p.prefix}/{p.length} tokens as merged]" if p else ""))
        rows.append([prompt, *([] if on_train else [refs[i][:80]]), *cells])
    intro = ("Training prompts (a sample; the data has no eval rows): merged and served side by side"
             if on_train else "Merged and served side by side with the eval reference")
    return "Answers", [intro + "; [a/b]: the served answer repeats the first a of the merged answer's b tokens."], rows


def _preference_section(pref: PreferenceCheck) -> Section:
    """How the base, the merged and the served model rank the chosen answers over the rejected."""
    if pref.method == "kto":
        text = [f"On {pref.pairs} labelled answers, the tuned model's log-probability per token rose "
                f"{_num(pref.merged_margin)} more for the good answers than for the bad ones, from the base."
                if pref.merged_margin is not None else
                f"{pref.pairs} labelled answers; the change from the base needs verify.compare."]
        return ("Preference", text, None)
    text = [f"On {pref.pairs} held-out pairs: the merged model prefers the chosen answer in "
            f"{_pct(pref.merged_accuracy)} of pairs (mean log-probability margin {_num(pref.merged_margin)}), the base "
            f"in {_pct(pref.base_accuracy)} ({_num(pref.base_margin)}). At the first token where the answers differ, "
            f"the served model puts the chosen one first in {_pct(pref.served_accuracy)} of pairs and agrees with the "
            f"merged model in {_pct(pref.agreement)} (Ollama returns log-probabilities of generated tokens only)."]
    rows = [["prompt", "margin (merged)", "margin (base)", "merged first", "served first"]]
    for item in pref.items:
        rows.append([item.prompt[:60], _num(item.merged_margin, "{:.2f}"), _num(item.base_margin, "{:.2f}"),
                     _choice(item.merged_first), _choice(item.served_first)])
    return ("Preference", text, rows)


def _choice(first: bool | None) -> str:
    return "–" if first is None else "chosen" if first else "rejected"


def _forgetting_section(forget: Forgetting) -> Section:
    text = [f"Of {forget.prompts} general-knowledge prompts, the base answered {forget.base_correct} correctly and "
            f"the tuned model {forget.tuned_correct}; the tune broke {forget.broken} and changed {forget.changed} "
            "answers."]
    rows = [["prompt", "expected", "base", "tuned"]]
    rows += [[i.prompt, i.expect, i.base[:70], i.tuned[:70]] for i in forget.items]
    return "Forgetting", text, rows


def _mix_section(data: DataResult) -> Section:
    """A mix of datasets (data.sources): what each source gave the training rows."""
    text = [f"{data.rows} training rows mixed from {len(data.sources)} sources (data.sources), drawn with train.seed; "
            "rows read are each source's usable rows, eval rows those held out of it or its own eval file's."]
    rows = [["source", "layout", "rows read", "bad rows", "eval rows", "kept in the mix", "share", "weight"]]
    rows += [[s.path + (f" @ {s.revision[:12]}" if s.revision else ""), s.layout, str(s.rows), str(s.bad_rows),
              str(s.eval_rows), str(s.kept) + (f" (max_rows {s.max_rows})" if s.max_rows else ""), _pct(s.share),
              "-" if s.weight is None else f"{s.weight:g}"]
             for s in data.sources]
    return "Data mix", text, rows


def _training_section(train: TrainMetrics) -> Section:
    text = [f"Engine `{train.engine}` on {train.device}, {train.steps} steps, final loss "
            f"{_num(train.final_loss, '{:.4f}')}, {train.seconds} s"
            + (f" (resumed from {train.resumed_from})" if train.resumed_from else "") + "."]
    if train.packing:  # recorded since issue 29: how the batch, checkpointing and packing were settled
        text.append(_setup_paragraph(train))
    if train.method == "grpo":
        text.append(_grpo_paragraph(train))
    elif train.method != "sft":
        text.append(_preference_paragraph(train))
    if train.tracker:
        text.append(_tracker_paragraph(train.tracker, train.tracker_run))
    return "Training", text + ([f"![loss]({LOSS_PLOT})"]), None


def _setup_paragraph(train: TrainMetrics) -> str:
    """The batch, checkpointing and batching trained with, as training chose them (train_auto.py)."""
    attention = f", {train.attention} attention" if train.attention else ""
    return (f"Batch {train.per_device_batch} x {train.gradient_accumulation} accumulation per process, gradient "
            f"checkpointing {train.gradient_checkpointing}, {train.packing} batches{attention}"
            + (f" ({train.plan})" if train.plan else "") + ".")


def _tracker_paragraph(tracker: str, run: str | None) -> str:
    """Where the training logs went (train.report_to): TensorBoard's folder and the command that shows it, or the
    tracker's run (a link when it is a URL)."""
    from .trackers import TRACKERS

    name = TRACKERS.get(tracker, (tracker, tracker))[1]
    if tracker == "tensorboard" and run:
        return f"Training logs in {name}: `{run}` (view with `tensorboard --logdir {Path(run).parent}`)."
    if run and run.startswith(("http://", "https://")):
        return f"Training logs in {name}: <{run}>."
    return f"Training logs in {name}" + (f": {run}." if run else ".")


def _grpo_paragraph(train: TrainMetrics) -> str:
    """A GRPO run's method and how the mean reward of its sampled answers moved."""
    text = (f"Method `grpo`: GRPO (Group Relative Policy Optimization), answers sampled and scored by the reward "
            f"functions as it trained; final mean reward {_num(train.final_reward)}")
    scored = [p for p in train.reward_history if p.reward is not None]
    if len(scored) > 1:
        text += f", from {_num(scored[0].reward)} at step {scored[0].step}"
    if scored and scored[-1].functions:
        text += " (" + ", ".join(f"{name} {_num(v)}" for name, v in scored[-1].functions.items()) + ")"
    return text + "."


def _rewards_section(check: RewardCheck) -> Section:
    """The reward functions on the greedy answers to the eval prompts: served, merged and base."""
    text = [f"The reward functions on greedy answers (at most {check.max_tokens} tokens) to {check.prompts} eval "
            f"prompts: mean reward served {_num(check.served)}, merged {_num(check.merged)}, base "
            f"{_num(check.base)}."]
    rows = [["reward function", "served", "merged", "base", "served answers scored"]]
    rows += [[f.name, _num(f.served), _num(f.merged), _num(f.base), str(f.scored)] for f in check.functions]
    return "Rewards", text, rows


def _preference_paragraph(train: TrainMetrics) -> str:
    """A preference run's method and how its reward margin (and the reward accuracy of DPO and ORPO; ORPO's log odds
    ratio) ended."""
    names = {"dpo": "DPO (Direct Preference Optimization)", "kto": "KTO (Kahneman-Tversky Optimization)",
             "orpo": "ORPO (Odds Ratio Preference Optimization: SFT on the chosen answers and an odds-ratio "
                     "preference term in one loss, no reference model; its rewards are beta x the mean "
                     "log-probability per answer token)"}
    text = (f"Method `{train.method}`: {names.get(train.method, train.method)}; final reward margin (chosen minus "
            f"rejected) {_num(train.final_margin)}")
    margins = [p for p in train.preference_history if p.margin is not None]
    if len(margins) > 1:
        text += f", from {_num(margins[0].margin)} at step {margins[0].step}"
    if train.final_accuracy is not None:
        text += f"; final reward accuracy {_pct(train.final_accuracy)} (pairs whose chosen answer scored higher)"
    odds = [p for p in train.preference_history if p.log_odds_ratio is not None]
    if odds:
        text += (f"; final log odds ratio (chosen over rejected) {_num(odds[-1].log_odds_ratio)}, SFT loss on the "
                 f"chosen answers {_num(odds[-1].nll_loss, '{:.4f}')}")
    return text + "."


def _deploy_section(register: RegisterResult, export: ExportResult) -> Section:
    """An adapter deploy: what it uploaded against what a full model would have."""
    full, adapter = register.full_model_bytes or 0, register.adapter_bytes or 0
    rows = [["what", "size", "uploaded this run"],
            [f"full model ({export.served}), not uploaded", _size(full), "-"],
            [f"base `{register.base_model}` (once per base)", _size(export.base_bytes or 0),
             _size(register.base_uploaded_bytes or 0)],
            ["LoRA adapter (this tune)", _size(adapter), _size(register.uploaded_bytes)]]
    text = [f"Deployed as a LoRA adapter on `{register.base_model}` (Ollama ADAPTER): a new tune of this base "
            f"uploads {_size(adapter)} instead of {_size(full)}"
            + (f" ({full / adapter:.1f}x less)." if adapter else ".")]
    return "Deploy", text, rows


def _record_sections(manifest: dict[str, Any]) -> list[Section]:
    """Time per stage, the weights among the artifacts, and the versions and provenance: the run's own records."""
    out: list[Section] = []
    rows = [["stage", "status", "seconds"]]
    rows += [[name, s.get("status", ""), str(s.get("seconds", ""))] for name, s in manifest.get("stages", {}).items()]
    out.append(("Time per stage", [], rows))

    rows = [["artifact", "size", "sha256"]]
    arts = manifest.get("artifacts", {})
    big = {k: v for k, v in arts.items() if k.endswith((".gguf", ".safetensors"))}
    rows += [[k, _size(v["size"]), v["sha256"][:16] + "…"] for k, v in sorted(big.items())]
    out.append(("Artifacts", [f"{len(arts)} files recorded in {MANIFEST_FILE}; weights shown."], rows))

    versions = manifest.get("versions", {})
    rows = [["tool", "version"]] + [[k, str(v)] for k, v in versions.items()]
    base = manifest.get("base_model", {})
    revision = f" at revision {base['revision']}" if base.get("revision") else ""
    out.append(("Versions and provenance", [f"Base model: `{base.get('spec', '?')}`{revision}"], rows))
    return out


def _quant_section(export: ExportResult) -> Section:
    """Which quant is served and why: each type the quant gate measured, in the order it measured them."""
    on = {"eval": "the eval conversations", "train": "a sample of the training conversations (no eval rows)"}
    text = [export.quant_note or f"Served: {export.served}."]
    if export.fidelity:
        text.append(f"Top-1 token agreement with the unquantized GGUF on {on.get(export.gate_prompts, 'the eval')}"
                    f", gated at verify.min_fidelity {export.min_fidelity}"
                    + (" (`--quant auto`: tried smallest first, the first that passes is served and only it is kept)."
                       if export.auto else "."))
    rows = [["type", "top-1 vs unquantized", "perplexity ratio", "result"]]
    for qtype, scores in export.fidelity.items():
        result = ("served" if qtype == export.served else
                  "below the gate" + ("" if export.auto else ", own tag only") if qtype in export.flagged
                  else "passes, own tag")
        rows.append([qtype, _num(scores.get("top1_agreement")), _num(scores.get("ppl_ratio")), result])
    return "Quant choice", text, rows if export.fidelity else None


def _md_table(rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return lines


def build_report(run_dir: Path) -> tuple[Path, Path]:
    manifest_path = run_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        from .errors import StageMissingError

        raise StageMissingError(f"{run_dir}: no {MANIFEST_FILE}; is this a run directory?")
    manifest = read_manifest(manifest_path)  # a damaged one is an error naming it
    name = manifest.get("stages", {}).get("register", {}).get("outputs", {}).get("model") or run_dir.name
    parts = sections(manifest, name)

    md = [f"# ftdeploy run: {name}", ""]
    for title, paragraphs, rows in parts:
        md += [f"## {title}", ""]
        for p in paragraphs:
            md += [p, ""]
        if rows:
            md += _md_table(rows) + [""]
    md_path = atomic_write_text(run_dir / REPORT_MD, "\n".join(md))

    loss_png = run_dir / LOSS_PLOT
    img = (f'<img alt="loss" src="data:image/png;base64,{base64.b64encode(loss_png.read_bytes()).decode()}">'
           if loss_png.is_file() else "")
    body = [f"<h1>ftdeploy run: {html.escape(name)}</h1>"]
    for title, paragraphs, rows in parts:
        body.append(f"<h2>{html.escape(title)}</h2>")
        for p in paragraphs:
            if p.startswith("![loss]"):
                body.append(img)
                continue
            text = (html.escape(p).replace("**PASS**", "<b class=pass>PASS</b>")
                    .replace("**FAIL**", "<b class=fail>FAIL</b>"))
            text = _AUTOLINK.sub(r'<a href="\1">\1</a>', text)  # markdown's <https://...>
            body.append(f"<p>{text}</p>")
        if rows:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0]) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:]]
            body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;"
             "text-align:left;font-size:.9rem}th{background:#f3f3f3}.pass{color:#187a2f}.fail{color:#b00020}"
             "img{max-width:40rem}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>ftdeploy {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    html_path = atomic_write_text(run_dir / REPORT_HTML, page)
    return md_path, html_path
