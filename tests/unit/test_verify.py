import pytest

from ftdeploy.errors import DataError, VerifyError
from ftdeploy.fidelity import agreement_scores, chrf, contains, forgetting, prompt_agreement, score
from ftdeploy.results import Answer, ModelScore, ParityMismatch, PromptAgreement, TemplateParity, VerifySummary
from ftdeploy.stages.verify import check, failures, generation_limit, summarize, template_parity, unverified_name


def _summary(done_reasons, oks, parity_ok=True, merged_stopped=None, ratios=None, gated=True):
    """A served model's verify summary: its answers' done reasons and matches, what the merged model did."""
    answers = [Answer(prompt="q", expected="e", answer="a", ok=ok, done_reason=r, gated=gated)
               for ok, r in zip(oks, done_reasons, strict=True)]
    s = summarize(answers, 0.8)
    s.min_agreement, s.max_tokens, s.prompts = 0.7, 31, ["q"] * len(answers)
    s.template_parity = TemplateParity(checked=3, passed=parity_ok,
                                       mismatches=[] if parity_ok else [ParityMismatch(raw="x", chat_answer="y")])
    merged_stopped = merged_stopped or [True] * len(answers)
    ratios = ratios or [1.0] * len(answers)
    prompts = [PromptAgreement(prefix=int(10 * r), length=10, ratio=r, merged_stopped=m, served_stopped=d == "stop")
               for r, m, d in zip(ratios, merged_stopped, done_reasons, strict=True)]
    s.models = [ModelScore(role="merged", label="merged", replies=["merged answer"] * len(answers)),
                ModelScore(role="served", label="q4_k_m", quant="q4_k_m", tag="m", replies=["a"] * len(answers),
                           gated=True, **agreement_scores(prompts))]
    return s


def test_answers_that_run_on_where_the_merged_model_stopped_fail_naming_template_and_stops():
    with pytest.raises(VerifyError, match=r"(?s)stops: m \(q4_k_m\): 3/5 answers ran to the length limit "
                                          r"\(31 tokens\).*TEMPLATE or the PARAMETER stop.*e\.g\. 'q': merged"):
        check(_summary(["length", "length", "stop", "length", "stop"], [True] * 5,
                       ratios=[0.9, 0.9, 1.0, 0.9, 1.0]), "m")


def test_running_to_the_limit_is_no_template_problem_when_the_merged_model_ran_on_too():
    """Free-form answers longer than the limit: both ran on, which says nothing about the stop tokens."""
    check(_summary(["length"] * 5, [True] * 5, merged_stopped=[False] * 5), "m")
    # One near-tie at the end of one answer is not a broken stop token either.
    check(_summary(["stop", "length", "stop", "stop", "stop"], [True] * 5, ratios=[1, 0.9, 1, 1, 1]), "m")


def test_a_template_mismatch_fails_verify():
    with pytest.raises(VerifyError, match="differs from the training chat template"):
        check(_summary(["stop"] * 5, [True] * 5, parity_ok=False), "m")


def test_below_min_score_fails_and_at_it_passes():
    with pytest.raises(VerifyError, match=r"(?s)expected_answers: m \(q4_k_m\): 3/5 expected answers came "
                                          r"back.*e\.g\."):
        check(_summary(["stop"] * 5, [True, True, True, False, False]), "m")
    check(_summary(["stop"] * 5, [True, True, True, True, False]), "m")


def test_rows_without_expect_are_scored_not_gated():
    summary = _summary(["stop"] * 5, [False] * 5, gated=False)
    assert (summary.hits, summary.expect_rows) == (0, 0)
    check(summary, "m")


def test_no_eval_prompts_fails():
    with pytest.raises(VerifyError, match="no eval prompts to verify with; give data.eval or data.eval_split"):
        check(VerifySummary(), "m")


def test_a_quant_that_does_not_follow_the_merged_model_fails_with_its_name_and_an_example():
    summary = _summary(["stop"] * 4, [True] * 4, ratios=[0.1, 0.0, 0.2, 0.0])  # 3 steps kept, 4 differences
    found = failures(summary, "m")
    assert [(f.check, f.model, f.quant) for f in found] == [("agreement", "m", "q4_k_m")]
    assert "at 43% of greedy steps, counted up to each answer's first difference (verify.min_agreement 70%)" in \
        found[0].message
    assert found[0].example.startswith("'q': merged 'merged answer' (stopped), served 'a'")
    # A quant export already flagged is reported, not gated.
    summary.models[1].gated = False
    assert failures(summary, "m") == []


def test_agreement_counts_tokens_from_the_start_and_the_stop_as_one():
    assert prompt_agreement([1, 2, 3], True, [1, 2, 3], True).ratio == 1.0
    missed_stop = prompt_agreement([1, 2, 3, 4, 5], False, [1, 2, 3], True)
    assert (missed_stop.prefix, missed_stop.length, missed_stop.ratio) == (3, 4, 0.75)
    assert prompt_agreement([1, 9, 3], True, [1, 2, 3], True).ratio == 0.25
    assert prompt_agreement([1, 2], False, [1, 2], False).ratio == 1.0  # both cut at the limit
    assert prompt_agreement([], True, [], True).ratio == 1.0 and prompt_agreement([5], True, [], True).ratio == 0.0


def test_the_gate_counts_greedy_steps_up_to_the_first_difference_whatever_the_answer_length():
    """A near-lossless quant flips a near-tie now and then: on a paragraph that cuts the shared prefix short, so the
    mean prefix share falls with the answer's length while the share of agreeing steps does not."""
    short = [prompt_agreement([1, 2, 3, 4], True, [1, 2, 3, 4], True)] * 4
    long = [prompt_agreement(list(range(20)) + [99], False, list(range(60)), True)] * 4
    assert agreement_scores(short)["token_agreement"] == 1.0
    scores = agreement_scores(long)
    assert scores["token_agreement"] == round(20 / 21, 4) and scores["prefix_share"] == round(20 / 61, 4)
    assert scores["stop_agreement"] == 0.0
    assert agreement_scores([]) == {"token_agreement": None, "prefix_share": None, "stop_agreement": None,
                                    "prompts": []}


def test_the_generation_limit_comes_from_the_references():
    assert generation_limit([10, 22, 4]) == 41  # 1.5 x 22 + 8
    assert generation_limit([10], override=96) == 96
    assert generation_limit([]) == 96  # no reference answers: the old fixed limit


def test_unverified_names():
    assert unverified_name("demo") == "demo-unverified"
    assert unverified_name("demo:q8_0") == "demo-unverified:q8_0"


def test_chrf_scores_free_form_answers():
    ref = "Water boils at 100 degrees Celsius at sea level. At higher altitudes it boils at lower temperatures."
    assert chrf([ref], [ref]) == 100.0
    close = chrf(["Water boils at 100 degrees Celsius at sea level. Up high it boils at a lower temperature."], [ref])
    far = chrf(["The capital of France is Paris."], [ref])
    assert close is not None and far is not None and close > 60 > far
    assert chrf(["x"], [""]) is None  # no reference: no score


def test_scores_and_forgetting():
    assert contains("It is Seven days", "seven|7") and not contains("six", "seven|7")
    s = score(["Port 7341.", "no idea"], ["7341", "Penbrook"], merged=["Port 7341.", "Orla Penbrook"],
              references=["The port is 7341.", "Orla Penbrook."])
    assert (s["hits"], s["match"], s["agreement"]) == (1, 0.5, 0.5) and 0 < s["chrf"] < 100
    f = forgetting(["Paris", "blue sky"], ["Paris", "teal and copper"], ["Paris", "blue"])
    assert f == {"prompts": 2, "base_correct": 2, "tuned_correct": 1, "broken": 1, "changed": 1}


class _RecordingClient:
    """Answers every request with the same text and records what was asked, in order."""

    def __init__(self):
        self.calls = []

    def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
        self.calls.append(("unload" if prompt == "" and keep_alive == 0 else "raw", keep_alive))
        return {"response": "" if prompt == "" else "Blue, red, green."}

    def chat(self, model, messages, options=None, keep_alive=None, tools=None):
        self.calls.append(("chat", keep_alive))
        return {"message": {"content": "Blue, red, green."}}


def test_template_parity_meets_both_sides_with_the_same_cache_states_in_two_loads():
    from ftdeploy.stages.verify import PARITY_CHATS

    client = _RecordingClient()
    result = template_parity(client, "m", lambda chat, gen: "<prompt>", None, PARITY_CHATS)
    assert result.passed and result.checked == 3
    kinds = [kind for kind, _ in client.calls]
    assert kinds == ["unload", "raw", "raw", "raw", "unload", "chat", "chat", "chat"]
    assert all(keep is None for kind, keep in client.calls if kind != "unload"), "no unload between probe requests"


def test_batched_greedy_answers_are_the_one_at_a_time_answers(tmp_path):
    """Left padding must not change what the model says: the batch gives each chat its own greedy answer."""
    from conftest import build_tiny_model_dir

    from ftdeploy.fidelity import HFModel

    hf = HFModel(build_tiny_model_dir(tmp_path / "tiny"))
    chats = [[{"role": "user", "content": "What port does the Zephyr service use?"}],
             [{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "hello world"}]]
    batched = hf.generate(chats, [12, 5, 12])
    alone = [hf.generate([c], [n])[0] for c, n in zip(chats, [12, 5, 12], strict=True)]
    assert batched == alone


def test_match_modes_per_eval_row(tmp_path):
    import json

    from conftest import read_dataset

    assert contains("Port 7341.", "port 7341", "exact") and not contains("It is port 7341.", "port 7341", "exact")
    assert contains("The port is 7341", r"\b73\d\d\b", "regex") and not contains("port 1234", r"\b73\d\d\b", "regex")
    path = tmp_path / "eval.jsonl"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": messages, "expect": "7[", "match": "regex"},
            {"messages": messages, "match": "fuzzy"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        read_dataset(str(path))
    assert f"{path}:1: 'expect' is not a valid regex" in str(err.value)
    assert f"{path}:2: 'match' must be contains, exact or regex" in str(err.value)


def _chatml_tools_mapping():
    from ftdeploy.chat_template import ChatTemplate, mapping_for_template
    from ftdeploy.tokenizer import read_chat_template_file

    mapping = mapping_for_template(ChatTemplate(read_chat_template_file("chatml-tools"), "", "<|im_end|>"),
                                   "chatml-tools")
    assert mapping.tools
    return mapping


CALL = {"function": {"name": "lookup_port", "arguments": {"service": "bramblewick"}}}
CALL_TEXT = '<tool_call>\n{"name": "lookup_port", "arguments": {"service": "bramblewick"}}\n</tool_call>'


def test_a_served_reply_parsed_into_tool_calls_reads_as_the_model_wrote_it():
    """Ollama returns message.tool_calls and empty content; verify scores and compares the calls as the format
    writes them after the generation prompt, which is what the merged model generates."""
    mapping = _chatml_tools_mapping()
    assert mapping.tool_calls_text([CALL]) == CALL_TEXT
    assert mapping.tool_calls_text([CALL, CALL], "One moment.") == f"One moment.\n{CALL_TEXT}\n{CALL_TEXT}"
    from ftdeploy.templates import jinja_renderer, training_messages
    from ftdeploy.tokenizer import read_chat_template_file

    render = jinja_renderer(read_chat_template_file("chatml-tools"), "", "<|im_end|>")
    ask = [{"role": "user", "content": "Port of bramblewick?"}]
    head = render(ask, True)
    whole = render(training_messages([*ask, {"role": "assistant", "content": "", "tool_calls": [CALL]}]), False)
    assert whole == head + CALL_TEXT + "<|im_end|>\n"  # the training template writes exactly that


def test_verify_asks_with_the_rows_tools_and_scores_the_parsed_call(tmp_path):
    from ftdeploy.data import Record
    from ftdeploy.stages.verify import ask_all, reference_answer

    tool = {"type": "function", "function": {"name": "lookup_port", "parameters": {"type": "object"}}}
    row = Record("eval.jsonl:1", messages=[{"role": "user", "content": "Port of bramblewick?"},
                                           {"role": "assistant", "tool_calls": [{"type": "function", **CALL}]}],
                 expect="lookup_port", tools=[tool])
    asked = []

    class Client:
        def chat(self, model, messages, options=None, keep_alive=None, tools=None):
            asked.append((messages, tools))
            return {"message": {"content": "", "tool_calls": [CALL]}, "done_reason": "stop"}

    mapping = _chatml_tools_mapping()
    [answer] = ask_all(Client(), "m", [row], 32, calls_text=mapping.tool_calls_text)
    assert asked == [([row.messages[0]], [tool])]
    assert answer.answer == CALL_TEXT and answer.ok
    assert reference_answer(row, mapping.tool_calls_text) == CALL_TEXT
    assert reference_answer(row) == '[{"name": "lookup_port", "arguments": {"service": "bramblewick"}}]'


def test_template_parity_sends_tool_chats_with_their_tools_on_both_sides():
    from ftdeploy.stages.verify import PARITY_TOOL_CHATS

    rendered, chats = [], []

    def render(messages, add_generation_prompt, tools=None):
        rendered.append(tools)
        assert all("type" in c for m in messages for c in m.get("tool_calls", []))  # training form
        return "<prompt>"

    class Client:
        def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
            return {"response": "" if prompt == "" else CALL_TEXT}

        def chat(self, model, messages, options=None, keep_alive=None, tools=None):
            chats.append(tools)
            return {"message": {"content": "", "tool_calls": [CALL]}}

    mapping = _chatml_tools_mapping()
    result = template_parity(Client(), "m", render, None, PARITY_TOOL_CHATS, calls_text=mapping.tool_calls_text)
    assert result.passed and result.checked == 2
    assert rendered == chats == [c["tools"] for c in PARITY_TOOL_CHATS]
    # Without the format's writing of the calls, the parsed reply cannot equal the raw one.
    assert not template_parity(Client(), "m", render, None, PARITY_TOOL_CHATS).passed


def test_template_parity_lets_a_tool_call_close_and_ignores_ollamas_json_spacing():
    """A CI run's tool model: at 24 tokens the raw call was cut mid-JSON and /api/chat held the unfinished call back
    (an empty answer), a mismatch of nothing. Tool chats get room for the call to close, and the call Ollama parsed
    is compared without whitespace (its JSON spacing is Ollama's), while a different argument still fails."""
    from ftdeploy.stages.verify import PARITY_TOOL_CHATS, TOOL_PARITY_TOKENS

    spaced = '<tool_call>\n{"name": "get_tide", "arguments": {"where": {"harbour": "Porthleven"}}}\n</tool_call>'
    limits = []

    class Client:
        def __init__(self, parsed):
            self.parsed = parsed

        def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
            if prompt:
                limits.append(options["num_predict"])
            return {"response": "" if prompt == "" else spaced}

        def chat(self, model, messages, options=None, keep_alive=None, tools=None):
            limits.append(options["num_predict"])
            return {"message": {"content": "", "tool_calls": [self.parsed]}}

    def calls_text(calls, content=""):  # Ollama's compact writing of the parsed arguments
        import json

        fn = calls[0]["function"]
        arguments = json.dumps(fn["arguments"], separators=(",", ":"))
        return f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {arguments}}}\n</tool_call>'

    same = {"function": {"name": "get_tide", "arguments": {"where": {"harbour": "Porthleven"}}}}
    result = template_parity(Client(same), "m", lambda *a, **k: "<prompt>", None, PARITY_TOOL_CHATS,
                             calls_text=calls_text)
    assert result.passed and set(limits) == {TOOL_PARITY_TOKENS}
    other = {"function": {"name": "get_tide", "arguments": {"where": {"harbour": "Mousehole"}}}}
    assert not template_parity(Client(other), "m", lambda *a, **k: "<prompt>", None, PARITY_TOOL_CHATS,
                               calls_text=calls_text).passed
