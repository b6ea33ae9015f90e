"""Tool calls: each family's tool-call syntax is recognised from its real chat template, scripted model
answers parse into OpenAI tool_calls (or, when malformed, come back whole as content), the streaming parser
ends with exactly what the whole-text parser says however the answer is cut into deltas, and the templates
render a request's tools and a conversation that carries OpenAI tool calls and their results.

The templates are the published ones (tests/data/templates/): Qwen2.5/Qwen3, Llama 3.1/3.2 and Mistral
Nemo from the models' tokenizer configs; mistral-v3-tools and mistral-v11-tools are Mistral's own templates
(mistralai/mistral-common, chat_templates/templates/v3.jinja and v11.jinja: the list syntax of
Mistral 7B v0.3, and the ``[TOOL_CALLS]name[ARGS]{...}`` syntax of Mistral Small 3.2).
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from offload_rt.serve.toolcalls import (FORMATS, StreamParser, check_tools, detect, marker_tokens, parse,
                                        template_tools)
from offload_rt.tokenizer import Tokenizer
from tests.hf_models import template

# template file: (syntax it teaches, its special tokens)
TEMPLATES = {
    "qwen2.5-instruct.jinja": ("qwen", {"eos_token": "<|im_end|>"}),
    "qwen3.jinja": ("qwen", {"eos_token": "<|im_end|>"}),
    "llama-3.1-instruct.jinja": ("llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama-3.2-instruct.jinja": ("llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-nemo-instruct-2407.jinja": ("mistral", {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-v3-tools.jinja": ("mistral", {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-v11-tools.jinja": ("mistral", {"bos_token": "<s>", "eos_token": "</s>"}),
}
WITHOUT_TOOLS = ["gemma-2-it.jinja", "smollm2-instruct.jinja", "mistral-7b-instruct-v0.1.jinja"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}

PARIS = ("get_weather", {"city": "Paris"})
TOKYO = ("get_weather", {"city": "東京", "unit": "<celsius>"})
TIME = ("get_time", {})

# fmt: [(scripted answer, expected content, expected calls as (name, arguments object))]
SCRIPTS = {
    "qwen": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [PARIS]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "<celsius>"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None, [TOKYO, TIME]),
        ('<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
         '"arguments": {"city": "Paris"}}\n</tool_call>\nOne moment.',
         "<think>\nThe user wants weather.\n</think>\n\nLet me check.\nOne moment.", [PARIS]),
        # no arguments at all: {}; the last block's closing tag missing (the answer ended): still a call
        ('<tool_call>\n{"name": "get_time"}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Paris"}}', None, [TIME, PARIS]),
        # markers the reasoning mentions are not calls; reasoning that never ends has none
        ('<think>\nI answer with <tool_call> blocks.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}'
         '\n</tool_call>', "<think>\nI answer with <tool_call> blocks.\n</think>", [TIME]),
        ('<think>\nMaybe <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "same", []),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', "same", []),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"arguments": {}}\n</tool_call>', "same", []),  # a nameless call spoils them all
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "same", []),  # truncated
        # arguments given as a JSON string are read; NaN is no JSON a client could read
        ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>', None, [PARIS]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"temp": NaN}}\n</tool_call>', "same", []),
        ('<function_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</function_call>', "same", []),
        ("The capital of France is Paris.\n\n", "same", []),
    ],
    "llama3": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
        ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "東京", "unit": "<celsius>"}}; '
         '{"name": "get_time", "parameters": {}}', None, [TOKYO, TIME]),
        ('\n{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}\n', None, [PARIS]),
        ('<think>\nA call.\n</think>\n{"name": "get_time", "parameters": {}}', "<think>\nA call.\n</think>", [TIME]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}} and then I will tell you.', "same", []),
        ('Sure: {"name": "get_weather", "parameters": {"city": "Paris"}}', "same", []),  # calls open the answer
        ('{"name": "get_weather", "parameters": {"city": "Paris"}', "same", []),
        ('{"name": "Ada Lovelace", "born": 1815}', "same", []),  # a JSON answer, not a call
        ("<|python_tag|>brave_search.call(query=\"Paris weather\")", "same", []),  # a built-in tool: not ours
        ("Paris is sunny today.", "same", []),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "東京", "unit": "<celsius>"}, '
         '"id": "abcdef123"}, {"name": "get_time", "arguments": {}}]', None, [TOKYO, TIME]),
        ('I will look it up.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
         "I will look it up.", [PARIS, TIME]),
        ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', None, [PARIS]),
        # [TOOL_CALLS] is a special token: decoded without it, the list alone still counts
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS]),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}]', "same", []),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{', "same", []),
        ('[{"name": "Ada"}]', "same", []),  # a JSON list answer, not a call
        ("[TOOL_CALL] get_weather(Paris)", "same", []),
        ("[1] Paris is sunny.", "same", []),
    ],
}
CASES = [(fmt, *case) for fmt, cases in SCRIPTS.items() for case in cases]


def calls_of(tool_calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


def stream(text: str, fmt: str | None, cuts) -> tuple[str | None, list[dict], str]:
    """(content, tool_calls, content released before finish) of ``text`` pushed in pieces cut at ``cuts``."""
    parser, events, bounds = StreamParser(fmt), [], [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        events += parser.push(text[a:b])
    early = "".join(e[1] for e in events)
    events += parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content") or None
    calls = [e for e in events if e[0] == "tool_call"]
    assert [e[1] for e in calls] == list(range(len(calls)))  # indexes in order
    return content, [{"id": e[2], "type": "function", "function": {"name": e[3], "arguments": e[4]}}
                     for e in calls], early


def assert_ids(tool_calls: list[dict], fmt: str | None) -> None:
    pattern = r"[A-Za-z0-9]{9}" if fmt == "mistral" else r"call_[A-Za-z0-9]{24}"
    assert all(re.fullmatch(pattern, c["id"]) and c["type"] == "function" for c in tool_calls)
    assert len({c["id"] for c in tool_calls}) == len(tool_calls)


@pytest.mark.parametrize("file", list(TEMPLATES) + WITHOUT_TOOLS)
def test_detect_names_the_syntax_of_each_real_template(file):
    assert detect(template(file)) == (TEMPLATES[file][0] if file in TEMPLATES else None)


def test_detect_without_a_template_or_markers():
    assert detect(None) is None and detect("") is None
    assert detect("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None
    # Hermes-style templates teach the same <tool_call> blocks as Qwen
    assert detect("{%- if tools %}Call with <tool_call>{...}</tool_call>{%- endif %}") == "qwen"


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_scripted_answers_parse_and_stream_alike(fmt, text, content, calls):
    got_content, got_calls = parse(text, fmt)
    assert got_content == (text if content == "same" else content)
    assert calls_of(got_calls) == calls
    assert_ids(got_calls, fmt)
    # every arguments string is JSON of an object
    assert all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in got_calls)
    for cuts in ([], range(1, len(text)), range(3, len(text), 7)):
        s_content, s_calls, _ = stream(text, fmt, cuts)
        assert (s_content, calls_of(s_calls)) == (got_content, calls)
        assert_ids(s_calls, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_syntaxes_are_content(fmt):
    """An answer in another family's syntax is not a call for this one."""
    others = [text for other, cases in SCRIPTS.items() if other != fmt for text, _, calls in cases if calls]
    assert others and all(parse(text, fmt) == (text, []) for text in others)


@pytest.mark.parametrize("fmt", FORMATS)
def test_json_nested_too_deep_is_content(fmt):
    text = {"qwen": "<tool_call>", "llama3": "", "mistral": "[TOOL_CALLS]"}[fmt] + '{"name": "f", "arguments": ' + \
        "[" * 200_000
    assert parse(text, fmt) == (text, [])
    assert stream(text, fmt, [len(text) // 2])[:2] == (text, [])


def test_no_format_is_plain_content():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert parse(text, None) == (text, []) and parse("", None) == (None, [])
    assert stream(text, None, range(1, len(text)))[:2] == (text, [])


@pytest.mark.parametrize("fmt,text,early", [
    ("qwen", "Paris is sunny today, 21 degrees.", "Paris is sunny today, 21 degrees."),
    ("qwen", 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me check."),
    ("llama3", "Paris is sunny today.\n", "Paris is sunny today.\n"),
    ("mistral", 'One moment. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]', "One moment."),
    ("mistral", "Paris is sunny today.\n", "Paris is sunny today."),
    ("qwen", "<think>\nA <tool_call> block?\n", "<think>\nA <tool_call> block?\n"),  # reasoning goes out as it comes
])
def test_stream_releases_content_before_the_end(fmt, text, early):
    """Content goes out as it comes, up to a call marker (and the whitespace before it, which may end the
    content); calls wait for the end."""
    assert stream(text, fmt, range(1, len(text)))[2] == early


def test_stream_holds_back_a_marker_that_may_be_starting():
    parser = StreamParser("qwen")
    assert parser.push("Checking <tool") == [("content", "Checking")]
    assert parser.push("box> now") == [("content", " <toolbox> now")]
    assert parser.finish() == []
    parser = StreamParser("llama3")
    assert parser.push(" <|pyth") == [] and parser.push("on_tag|>x") == []
    assert parser.finish() == [("content", " <|python_tag|>x")]


# pieces scripted answers are made of: text that looks like the start of a marker, whitespace, good and
# broken calls of each syntax
_COMMON = ["Sure.", "Let me look", " ", "\n", "\n\n", "x", "{", "}", "[", "]", ";", "<", '"name"', "東京",
           "<think>", "</think>", "<thi", "</thi"]
_PIECES = {
    "qwen": _COMMON + ["<tool", "<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>",
                       '{"name": "get_weather", "arguments": {"city": "Paris"}}', '{"name": "get_time"}',
                       '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', '{"arguments": {}}'],
    "llama3": _COMMON + ["<|python", "<|python_tag|>", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                         '{"name": "get_time", "arguments": {}}', '{"name": "x"}', "; "],
    "mistral": _COMMON + ["[TOOL", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]abc123456", "get_time", '{"city": "Paris"}',
                          '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', '{"name": "get_time", '
                          '"arguments": {}}', "[TOOL_CALLS]get_time[ARGS]{}", ", "],
}


@st.composite
def answers(draw, fmt):
    text = draw(st.sampled_from(["", "", "<think>", "\n<think>\n", "<th"]))  # reasoning first, or not
    text += "".join(draw(st.lists(st.one_of(st.sampled_from(_PIECES[fmt]), st.text(max_size=3)), max_size=12)))
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=8))
    return text, cuts


@pytest.mark.parametrize("fmt", [*FORMATS, None])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_stream_equals_parse_wherever_the_answer_is_cut(fmt, data):
    text, cuts = data.draw(answers(fmt or "qwen"))
    content, tool_calls = parse(text, fmt)
    s_content, s_calls, early = stream(text, fmt, cuts)
    assert (s_content, calls_of(s_calls)) == (content, calls_of(tool_calls))
    assert_ids(s_calls, fmt)
    assert (content or "").startswith(early)
    if not tool_calls:
        assert content == (text or None)  # nothing lost, nothing added


# ---- templates ----

def tokenizer(tmp_path, file: str) -> Tokenizer:
    """offload_rt's Tokenizer with the template ``file`` (a one-word vocabulary: only rendering matters here)."""
    path = tmp_path / "tokenizer.json"
    words = HFTokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    words.save(str(path))
    return Tokenizer(path, {"chat_template": template(file), **TEMPLATES.get(file, (None, {}))[1]})


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a scripted answer of each syntax with one call (Llama 3's templates take one call per message)
ANSWER = {"qwen": SCRIPTS["qwen"][0][0], "llama3": SCRIPTS["llama3"][0][0], "mistral": SCRIPTS["mistral"][0][0]}


@pytest.mark.parametrize("file", list(TEMPLATES))
def test_tools_reach_the_prompt(file, tmp_path):
    tok = tokenizer(tmp_path, file)
    prompt = tok.render_chat(ASK, [WEATHER, CLOCK])
    for piece in ("get_weather", "Current weather in a city", "the city's name", "get_time"):
        assert piece in prompt
    assert "What is the weather in Paris?" in prompt
    assert "get_weather" not in tok.render_chat(ASK) and "get_weather" not in tok.render_chat(ASK, None)
    assert tok.encode_chat(ASK, [WEATHER, CLOCK]) == tok.encode(prompt, add_bos=False)
    assert len(tok.encode_chat(ASK, [WEATHER, CLOCK])) > len(tok.encode_chat(ASK))


@pytest.mark.parametrize("file", list(TEMPLATES))
def test_a_tool_call_and_its_result_go_back_into_the_conversation(file, tmp_path):
    """The model's answer, parsed into OpenAI's form (arguments a JSON string, content null, the ids
    generated here), comes back with the tool's result and renders as transformers renders the same
    conversation with the arguments as an object (what templates print with tojson)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    fmt, special = TEMPLATES[file]
    content, tool_calls = parse(ANSWER[fmt], fmt)
    assert content is None and len(tool_calls) == 1
    openai = ASK + [{"role": "assistant", "content": None, "tool_calls": tool_calls},
                    {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": '{"temp": 21}'}]
    sent = json.dumps(openai)
    prompt = tokenizer(tmp_path, file).render_chat(openai, [WEATHER])
    assert json.dumps(openai) == sent  # the caller's messages are left alone
    as_objects = json.loads(sent)
    as_objects[1]["content"] = ""
    as_objects[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    ref = render_jinja_template([as_objects], tools=[WEATHER], chat_template=template(file),
                                add_generation_prompt=True, **special)[0][0]
    assert prompt == ref
    assert "Paris" in prompt and '\\"city\\"' not in prompt and "21" in prompt


def test_string_arguments_that_are_not_a_json_object_stay_strings(tmp_path):
    tok = tokenizer(tmp_path, "qwen3.jinja")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}
    prompt = tok.render_chat(ASK + [{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert '"arguments": Paris}' in prompt  # Qwen3 prints string arguments as they are
    empty = {**call, "function": {"name": "get_time", "arguments": ""}}
    assert '"arguments": {}}' in tok.render_chat(ASK + [{"role": "assistant", "tool_calls": [empty]}])


def test_marker_tokens_are_the_markers_the_parser_reads():
    for fmt, cases in SCRIPTS.items():
        used = {m for text, _, calls in cases if calls for m in marker_tokens(fmt) if m in text}
        assert used and used <= set(marker_tokens(fmt))
    assert marker_tokens(None) == ()


# ---- the request's tools ----

@pytest.mark.parametrize("tools,choice,error", [
    ([WEATHER, CLOCK], None, None),
    ([WEATHER], "auto", None),
    ([WEATHER], "required", None),
    ([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, None),
    (None, "none", None),
    (None, None, None),
    ([{"type": "function", "function": {"name": "f"}}], None, None),  # description, parameters optional
    ([], None, "non-empty array"),
    ({"type": "function"}, None, "non-empty array"),
    (["get_weather"], None, "tools[0]"),
    ([{"type": "retrieval", "function": WEATHER["function"]}], None, '"type": "function"'),
    ([{"type": "function"}], None, "tools[0].function"),
    ([WEATHER, {"type": "function", "function": {"name": "get weather"}}], None, "tools[1].function.name"),
    ([WEATHER, WEATHER], None, "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], None, "parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "description"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    (None, "required", "needs 'tools'"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "'get_time', which is not in 'tools'"),
    ([WEATHER], {"type": "function", "function": {}}, "tool_choice.function.name"),
    ([WEATHER], {"type": "function"}, "tool_choice.function.name"),
])
def test_check_tools(tools, choice, error):
    message = check_tools(tools, choice)
    assert message is None if error is None else error in message


def test_template_tools_follow_tool_choice():
    tools = [WEATHER, CLOCK]
    assert template_tools(tools, None) == tools and template_tools(tools, "auto") == tools
    assert template_tools(tools, "required") == tools
    assert template_tools(tools, "none") is None and template_tools(None, "auto") is None
    assert template_tools(tools, {"type": "function", "function": {"name": "get_time"}}) == [CLOCK]
