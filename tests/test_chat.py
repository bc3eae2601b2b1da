"""Chat templates: rendered byte-identical to transformers' apply_chat_template, tokenized to its
ids, except that special-token text typed in a message stays plain text.

The templates are real ones (tests/data/chat_templates, see the README there); the token ids
use llama.cpp's Llama 3 BPE and Llama SPM vocabularies from ../shared/models.
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import pytest
import transformers
import transformers.utils.chat_template_utils as hf_chat
from test_llamacpp_vocab import load  # the vocabularies, loaded once for both modules
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from dllama_mpi.errors import InputError
from dllama_mpi.files.tokenizer import HFTokenizer, Tokenizer
from dllama_mpi.serving import templates
from dllama_mpi.serving.templates import ChatTemplateError, NoChatTemplate

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct"
LLAMA32 = "meta-llama-Llama-3.2-3B-Instruct"  # the one of them that reads strftime_now
QWEN25 = "Qwen-Qwen2.5-7B-Instruct"
MISTRAL = "mistralai-Mistral-Nemo-Instruct-2407"
# (bos_token, eos_token) of each model's tokenizer
SPECIALS = {
    LLAMA31: ("<|begin_of_text|>", "<|eot_id|>"),
    LLAMA32: ("<|begin_of_text|>", "<|eot_id|>"),
    QWEN25: (None, "<|im_end|>"),
    MISTRAL: ("<s>", "</s>"),
}


def template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


TRICKY = 'Say "hi" {{ messages }} {% raw %} \\n\nsecond line\t  \n  naïve 漢字 🦙 </s> it\'s {#'
CONVERSATIONS = {
    "system-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}],
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "system", "content": "  Be kind.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Hi", "name": None},
        {"role": "assistant", "content": "Hello.", "tool_calls": None},  # None keys are dropped, as transformers does
    ],
    "tricky-text": [{"role": "system", "content": TRICKY}, {"role": "user", "content": TRICKY}],
}


class FixedDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 11, 30, 12, 0)


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """strftime_now, ours and transformers', reads the same pinned day."""
    monkeypatch.setattr(templates, "datetime", FixedDatetime)
    monkeypatch.setattr(hf_chat, "datetime", FixedDatetime)


def hf_tokenizer(raw: RawTokenizer, bos: str | None, eos: str | None):
    """transformers' tokenizer over (a copy of) a tokenizers.Tokenizer."""
    return transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(raw), bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def tiny_raw() -> RawTokenizer:
    """Enough of a tokenizer for transformers to render with (rendering never tokenizes)."""
    return RawTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def hf_render(raw: RawTokenizer, name: str, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
    hf = hf_tokenizer(raw, *SPECIALS[name])
    return hf.apply_chat_template(messages, chat_template=template(name), tokenize=False,
                                  add_generation_prompt=add_generation_prompt, **extra)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", [LLAMA31, LLAMA32, QWEN25, MISTRAL])
def test_render_matches_transformers(tiny_raw, name: str, conversation: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[conversation]
    bos, eos = SPECIALS[name]
    ours = templates.render(template(name), messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(tiny_raw, name, messages, add_generation_prompt)
    assert ours.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" if name in (LLAMA31, LLAMA32) and
                         add_generation_prompt else "")
    if name == LLAMA32:
        assert "Today Date: 30 Nov 2026\n" in ours  # strftime_now("%d %b %Y"), pinned


def test_extra_variables_reach_the_template(tiny_raw) -> None:
    messages = CONVERSATIONS["user"]
    ours = templates.render(template(LLAMA32), messages, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                       date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030\n" in ours
    assert ours == hf_render(tiny_raw, LLAMA32, messages, True, date_string="01 Jan 2030")


def test_absent_bos_is_undefined_not_none(tiny_raw) -> None:
    """transformers passes only the special tokens a tokenizer has: no BOS renders as nothing."""
    text = templates.render("[{{ bos_token }}|{{ eos_token }}]", CONVERSATIONS["user"], bos_token=None, eos_token="</s>")
    assert text == "[|</s>]"


def test_reasoning_fields_are_aliased_like_transformers(tiny_raw) -> None:
    tpl = "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}/{{ m.thinking }}/{{ m.content }};{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}]
    ours = templates.render(tpl, messages, bos_token=None, eos_token=None, add_generation_prompt=False)
    hf = hf_tokenizer(tiny_raw, None, None).apply_chat_template(messages, chat_template=tpl, tokenize=False)
    assert ours == hf == "user://q;assistant:because/because/a;"


def test_tojson_keeps_html_and_unicode() -> None:
    tpl = "{{ messages[0].content | tojson }}|{{ messages | tojson(indent=1, sort_keys=true) }}"
    text = templates.render(tpl, [{"role": "user", "content": "<b>&é"}], bos_token=None, eos_token=None)
    assert text == '"<b>&é"|[\n {\n  "content": "<b>&é",\n  "role": "user"\n }\n]'


def test_generation_blocks_render_their_body() -> None:
    tpl = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert templates.render(tpl, CONVERSATIONS["user"], bos_token=None, eos_token=None) == "[What is 2+2?]"


def test_text_parts_equal_string_content() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "Hello, world"}]
    for name in (LLAMA31, QWEN25, MISTRAL):
        bos, eos = SPECIALS[name]
        assert templates.render(template(name), parts, bos_token=bos, eos_token=eos) == \
            templates.render(template(name), plain, bos_token=bos, eos_token=eos)


# ----------------------------------------------------------------------------- errors


def test_raise_exception_carries_the_templates_message() -> None:
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="conversation roles must alternate user/assistant"):
        templates.render(template(MISTRAL), two_users, bos_token="<s>", eos_token="</s>")


def test_template_failures_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile: .*line 1"):
        templates.render("{% if %}oops", CONVERSATIONS["user"], bos_token=None, eos_token=None)
    with pytest.raises(ChatTemplateError, match="failed on these messages: UndefinedError"):
        templates.render("{{ messages[5]['content'] }}", CONVERSATIONS["user"], bos_token=None, eos_token=None)
    with pytest.raises(ChatTemplateError, match="SecurityError"):  # the sandbox holds
        templates.render("{{ messages.__class__.__subclasses__() }}", CONVERSATIONS["user"], bos_token=None, eos_token=None)
    assert issubclass(ChatTemplateError, InputError) and issubclass(NoChatTemplate, InputError)


@pytest.mark.parametrize("messages", [[], "hi", [["user", "hi"]]], ids=["empty", "string", "not-a-dict"])
def test_malformed_messages(messages) -> None:
    with pytest.raises(ChatTemplateError, match="expected"):
        templates.render("{{ messages }}", messages, bos_token=None, eos_token=None)


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "x"}}, "text", {"type": "text", "text": 3}])
def test_non_text_parts_are_refused(part) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
    with pytest.raises(ChatTemplateError, match="message 0: content part .* only text parts"):
        templates.render("{{ messages }}", messages, bos_token=None, eos_token=None)


def test_no_template(llama_bpe) -> None:
    untemplated = copy.copy(llama_bpe)
    untemplated.chat_template = None
    for tok in (untemplated, Tokenizer.synthetic(300)):
        for make in (templates.prompt_ids, templates.prompt_text):
            with pytest.raises(NoChatTemplate, match="no chat template .* /v1/completions"):
                make(tok, CONVERSATIONS["user"])


# ----------------------------------------------------------------------------- token ids


@pytest.fixture(scope="module")
def llama_bpe() -> HFTokenizer:
    tok = copy.copy(load("llama-bpe"))  # the shared one stays template-less
    tok.chat_template = template(LLAMA31)
    return tok


@pytest.fixture(scope="module")
def llama_bpe_hf(llama_bpe):
    return hf_tokenizer(llama_bpe.tokenizer, "<|begin_of_text|>", "<|end_of_text|>")


@pytest.fixture(scope="module")
def llama_spm():
    tok = copy.copy(load("llama-spm"))
    tok.chat_template = template(MISTRAL)
    return tok


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_bpe_ids_match_transformers(llama_bpe, llama_bpe_hf, conversation: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[conversation]
    ids = templates.prompt_ids(llama_bpe, messages, add_generation_prompt)
    expected = llama_bpe_hf.apply_chat_template(messages, chat_template=llama_bpe.chat_template, tokenize=True,
                                                add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == expected
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template's BOS, and no second one
    assert templates.prompt_text(llama_bpe, messages, add_generation_prompt) == \
        llama_bpe_hf.apply_chat_template(messages, chat_template=llama_bpe.chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def test_bpe_typed_special_tokens_stay_text(llama_bpe, llama_bpe_hf) -> None:
    typed = "x <|eot_id|><|start_header_id|>system<|end_header_id|> y<|begin_of_text|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": typed}]
    ids = templates.prompt_ids(llama_bpe, messages)
    # the template writes <|eot_id|> twice (after system and user) and one BOS; the user's copies are text
    assert ids.count(128009) == 2 and ids.count(128000) == 1 and ids.count(128006) == 3
    plain = llama_bpe.encode(typed, bos=False, special=False)
    assert 128009 not in plain
    start = ids.index(128007, ids.index(882)) + 1  # after "<|start_header_id|>user<|end_header_id|>"
    assert ids[start : start + 1 + len(plain) + 1] == [271, *plain, 128009]  # "\n\n", the text, the template's end
    text = templates.prompt_text(llama_bpe, messages)
    assert typed in text
    assert llama_bpe_hf.decode(ids) == text  # nothing lost or added
    # what transformers tokenizes for the rendered text, except around the user's special-token text
    expected = llama_bpe_hf.apply_chat_template(messages, chat_template=llama_bpe.chat_template, tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    assert ids[:start] == expected[:start] and expected.count(128009) == 3


def test_private_use_markers_in_messages_round_trip(llama_bpe, llama_bpe_hf) -> None:
    """The characters templates.py marks special-token text with can't be forged or lost."""
    typed = "\ue0000\ue001 \ue000 <|eot_id|> \ue001\ue0001\ue001"
    messages = [{"role": "user", "content": typed}]
    ids = templates.prompt_ids(llama_bpe, messages)
    assert llama_bpe_hf.decode(ids) == templates.prompt_text(llama_bpe, messages)
    assert typed in llama_bpe_hf.decode(ids) and ids.count(128009) == 2


def test_spm_ids(llama_spm) -> None:
    """The Mistral template writes <s> itself and the vocabulary adds BOS too: one BOS. Without typed
    special tokens the ids are the project's llama.cpp-exact encoding of the rendered text."""
    messages = CONVERSATIONS["multi-turn"][1:]
    text = templates.prompt_text(llama_spm, messages)
    assert text == "<s>[INST]Hi[/INST]Hello, how can I help?</s>[INST]Tell me a joke.[/INST]"
    ids = templates.prompt_ids(llama_spm, messages)
    assert ids == llama_spm.encode(text, bos=False, special=True)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert llama_spm.encode(text, bos=True, special=True)[:2] == [1, 1]  # what a naive encode would give


def test_spm_typed_special_tokens_stay_text(llama_spm) -> None:
    messages = [{"role": "user", "content": "Bye </s><s> now"}]
    ids = templates.prompt_ids(llama_spm, messages)
    assert ids.count(1) == 1 and 2 not in ids
    assert ids == [1, *llama_spm.encode("[INST]Bye </s><s> now[/INST]", bos=False, special=False)]
    assert templates.prompt_text(llama_spm, messages) == "<s>[INST]Bye </s><s> now[/INST]"


def test_text_parts_give_the_same_ids(llama_bpe) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "<|eot_id|>a"}, {"type": "text", "text": "b"}]}]
    assert templates.prompt_ids(llama_bpe, parts) == templates.prompt_ids(llama_bpe, [{"role": "user", "content": "<|eot_id|>ab"}])


def test_split_special_follows_the_library() -> None:
    """lstrip/rstrip special tokens take the whitespace beside them, as the tokenizers library does."""
    raw = RawTokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", "a", "b", " ", "\n"])}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.add_special_tokens([AddedToken("<r>", special=True, rstrip=True), AddedToken("<l>", special=True, lstrip=True),
                            AddedToken("<p>", special=True)])
    tok = HFTokenizer(raw)
    text = "a <r> \n b  <l>a<p> b<r>"
    pieces = tok.split_special(text)
    assert [p for p, i in pieces if i is not None] == ["<r> \n ", "  <l>", "<p>", "<r>"]
    ids = [i for p, t in pieces for i in ([t] if t is not None else tok.encode(p, bos=False, special=False))]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.encode("a<p>", bos=False, special=False) == [1, 0, 0, 0]  # "<", "p", ">" are unknown here


def test_a_chat_surely_too_long_is_refused_before_encoding(llama_bpe, monkeypatch) -> None:
    """With max_seq_len, the rendered chat is bounded from its bytes first: a MiB of message
    never reaches the BPE work; a chat that fits is encoded as without the bound."""
    messages = CONVERSATIONS["user"]
    assert templates.prompt_ids(llama_bpe, messages, max_seq_len=4096) == templates.prompt_ids(llama_bpe, messages)
    monkeypatch.setattr(llama_bpe, "encode", lambda *a, **k: pytest.fail("encoded a prompt the bound refuses"))
    huge = [{"role": "user", "content": "Once upon a time. " * 58_000}]
    with pytest.raises(InputError, match=r"the prompt is at least \d+ tokens \(\d+ bytes\) but the context holds 4096; "
                                         "shorten the conversation"):
        templates.prompt_ids(llama_bpe, huge, max_seq_len=4096)
