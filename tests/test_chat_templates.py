"""Chat templates: the real templates of each family render exactly as transformers renders them, and a
template that refuses a conversation (``raise_exception``) is a user error: one line for that REPL turn with
the conversation going on, one line and exit status 2 in one-shot mode.

The templates are the published ones (tests/data/templates/, copied from the models' tokenizer configs),
saved into tokenizer_config.json files with each family's special tokens; the vocabulary is SmolLM2's.
"""

from __future__ import annotations

import io
import json

import pytest

from offload_rt.errors import ChatTemplateError, UserError
from offload_rt.tokenizer import Tokenizer
from storage.sources import HFSource
from tests.cli_helpers import assert_user_error, run_cli
from tests.hf_models import SMOLLM_VOCAB, template, tiny_model, write_checkpoint, write_tokenizer

# family: (template file, special tokens of that family's tokenizer_config.json)
FAMILIES = {
    "llama-3.1": ("llama-3.1-instruct.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama-3.2": ("llama-3.2-instruct.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-nemo": ("mistral-nemo-instruct-2407.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "qwen2.5": ("qwen2.5-instruct.jinja", {"bos_token": None, "eos_token": "<|im_end|>"}),
    "qwen3": ("qwen3.jinja", {"bos_token": None, "eos_token": "<|im_end|>"}),
    "smollm2": ("smollm2-instruct.jinja", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
}
CONVERSATION = [
    {"role": "system", "content": "You are terse.  Answer in one line.\n"},
    {"role": "user", "content": "  What is the capital of France? "},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis, on the Seine."},
    {"role": "user", "content": "And of Japan — in kanji? 東京?"},
]
# A tool call and its result: the templates print the arguments with transformers' tojson (no HTML escapes,
# keys in order, non-ASCII kept), a filter jinja2's own differs from.
TOOL_CALL = [
    {"role": "user", "content": "Weather in Tokyo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"unit": "<celsius>", "city": "東京"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21}"},
]


def tokenizer_dir(path, chat_template: str, **special):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_tokenizer(path, chat_template=chat_template, **special)
    return path


def ours(path) -> Tokenizer:
    """offload_rt's tokenizer as conversion stores it (HFSource reads the directory, Tokenizer renders)."""
    dest = path.parent / f"{path.name}-tokenizer.json"
    return Tokenizer(dest, HFSource(path).tokenizer(dest))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendering_equals_transformers(family, tmp_path):
    import transformers

    file, special = FAMILIES[family]
    path = tokenizer_dir(tmp_path / family, template(file), **special)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    tok = ours(path)
    # Token ids agree too where the family's special tokens are in this (SmolLM2) vocabulary; transformers
    # appends the others to it as new tokens, which a real checkpoint of that family never needs.
    same_vocab = all(t is None or t in ref_tok.get_vocab() and ref_tok.convert_tokens_to_ids(t) < SMOLLM_VOCAB
                     for t in special.values())
    # multi-turn with a system message; one user turn; a tool call
    for messages in (CONVERSATION, CONVERSATION[1:2], TOOL_CALL):
        ref = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(messages) == ref
        if same_vocab:
            assert tok.encode_chat(messages) == ref_tok(ref, add_special_tokens=False).input_ids
        # the template really rendered the turns
        assert all(m["content"].strip()[:12] in ref for m in messages if m["role"] in ("system", "user"))


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    """transformers' precedence: a chat_template.jinja file over tokenizer_config.json's chat_template."""
    import transformers

    path = tokenizer_dir(tmp_path / "both", template("qwen2.5-instruct.jinja"), bos_token=None,
                         eos_token="<|im_end|>")
    (path / "chat_template.jinja").write_text(template("smollm2-instruct.jinja"), encoding="utf-8")
    messages = CONVERSATION[1:2]
    ref = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ref.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours(path).render_chat(messages) == ref


@pytest.mark.parametrize("file,reason", [
    ("gemma-2-it.jinja", "System role not supported"),
    ("mistral-7b-instruct-v0.1.jinja", "Conversation roles must alternate user/assistant/user/assistant/..."),
])
def test_template_refusal_is_a_user_error_naming_the_reason(file, reason, tmp_path):
    import jinja2
    import transformers

    path = tokenizer_dir(tmp_path / "t", template(file), bos_token="<s>", eos_token="</s>")
    messages = CONVERSATION[:2]
    with pytest.raises(jinja2.TemplateError, match=reason.replace(".", r"\.")):  # transformers refuses it too
        transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError) as err:
        ours(path).render_chat(messages)
    assert isinstance(err.value, UserError) and str(err.value).endswith(reason)
    assert ours(path).render_chat(CONVERSATION[1:2]).endswith("[/INST]" if "mistral" in file else "model\n")


def test_repl_turn_refused_by_the_template_keeps_the_chat(tmp_path):
    """Bug 2: `/system be brief` then `hello` printed a jinja2 traceback and left; now one line, chat goes on."""
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model
    from offload_rt.repl import ChatREPL
    from offload_rt.session import Session

    hf = tiny_model("llama", seed=0, vocab_size=SMOLLM_VOCAB, bos_token_id=1, eos_token_id=2)
    # Mistral 7B Instruct v0.1's template: roles must alternate user/assistant, so a system message is refused
    model_dir = write_checkpoint(tmp_path / "mistral-v0.1-template", hf,
                                 chat_template=template("mistral-7b-instruct-v0.1.jinja"))
    cfg = RunConfig(model=str(model_dir), offload_dir=tmp_path / "stores", max_new_tokens=3, progress=False)
    session = Session(load_model(cfg), cfg)
    lines = iter(["/system be brief", "hello", "/system", "hello"])

    def read_line(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(session, out=out, err=err, read_line=read_line)
    assert repl.run() == 0
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert errors == ["error: the model's chat template refused the conversation: "
                      "Conversation roles must alternate user/assistant/user/assistant/..."]
    assert "Traceback" not in err.getvalue()
    # the refused turn left nothing behind; the turn after /system (cleared) was answered
    assert session.last.stop_reason in ("max_new_tokens", "eos")
    assert repl.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": session.last.text}]
    assert session.last.text in out.getvalue()


def test_one_shot_refusal_and_broken_template_are_user_errors(tmp_path):
    hf = tiny_model("llama", seed=0, vocab_size=SMOLLM_VOCAB, bos_token_id=1, eos_token_id=2)
    refusing = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('A system message is required') }}"
                "{% endif %}")
    model = write_checkpoint(tmp_path / "needs-system", hf, chat_template=refusing)
    proc = run_cli(model, "--prompt", "hello", "-n", "2", "--offload-dir", tmp_path / "stores")
    assert_user_error(proc, "chat template refused the conversation: A system message is required")
    assert proc.stdout == ""

    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m }"}))
    proc = run_cli(model, "--prompt", "hello", "-n", "2", "--offload-dir", tmp_path / "stores")
    assert_user_error(proc, "chat template is broken", "--raw")


def test_decode_keeps_the_special_tokens_asked_for(tmp_path):
    """The server's tool-call parser reads markers that may be special tokens (Mistral's [TOOL_CALLS]):
    a decoder told to keep them shows them; by default special tokens stay out of the text."""
    from offload_rt.tokenizer import StreamDecoder

    tok = ours(tokenizer_dir(tmp_path / "t", template("smollm2-instruct.jinja")))
    start = tok.token_ids(["<|im_start|>"])
    assert len(start) == 1 and tok.token_ids(["no such token here"]) == frozenset()
    ids = tok.encode("Hello") + list(start) + tok.encode(" world")
    assert "<|im_start|>" not in tok.decode(ids)
    kept = tok.decode(ids, start)
    assert kept == tok.decode(ids[:1]) + "<|im_start|>" + tok.decode(ids[2:]) and kept.startswith("Hello")
    dec = StreamDecoder(tok, start)
    streamed = "".join(dec.push([i]) for i in ids)
    assert streamed == kept
