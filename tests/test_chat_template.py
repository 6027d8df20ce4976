"""Chat templates: the 2B-4T template and fallback vs ref-hf.json `chat`, upstream llama.cpp's
tests/test-chat-template.cpp conversation and expected outputs for a few HF templates, sandbox and errors."""
from __future__ import annotations

import datetime

import pytest

from bitnet_py.chat_template import ChatTemplate
from bitnet_py.gguf.constants import Keys
from bitnet_py.tokenizer import Tokenizer
from bitnet_py.tokenizer_hf import metadata_from_hf_tokenizer
from conftest import fixture_path, load_reference
from test_tokenizer import gguf_tokenizer

# conversation and expected outputs of llama.cpp tests/test-chat-template.cpp (jinja expectations)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
    "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n"
    "<|im_start|>assistant\n"
)
ALPHAMONARCH_TEMPLATE = (
    "{% for message in messages %}{{bos_token + message['role'] + '\\n' + message['content'] + eos_token + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}"
)
ALPHAMONARCH_EXPECTED = (
    "<s>system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi there</s>\n<s>user\n"
    "Who are you</s>\n<s>assistant\n   I am an assistant   </s>\n<s>user\nAnother question</s>\n<s>assistant\n"
)
DEEPSEEK_CODER_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}\n{% set add_generation_prompt = false %}\n{% endif %}\n"
    "{%- set ns = namespace(found=false) -%}\n{%- for message in messages -%}\n    {%- if message['role'] == "
    "'system' -%}\n        {%- set ns.found = true -%}\n    {%- endif -%}\n{%- endfor -%}\n{{bos_token}}"
    "{%- if not ns.found -%}\n{{'You are an AI programming assistant, utilizing the Deepseek Coder model, "
    "developed by Deepseek Company, and you only answer questions related to computer science. For "
    "politically sensitive questions, security and privacy issues, and other non-computer science questions, "
    "you will refuse to answer\\n'}}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message['role'] "
    "== 'system' %}\n{{ message['content'] }}\n    {%- else %}\n        {%- if message['role'] == 'user' %}\n"
    "{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else %}\n{{'### Response:\\n' + "
    "message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{% if add_generation_prompt %}\n{{'### Response:'}}\n{% endif %}"
)
DEEPSEEK_CODER_EXPECTED = (
    "You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n<|EOT|>\n### Instruction:\n"
    "Who are you\n### Response:\n   I am an assistant   \n<|EOT|>\n### Instruction:\nAnother question\n"
    "### Response:\n"
)
GEMMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
)


def b158():
    meta = metadata_from_hf_tokenizer(fixture_path("tiny-bitnet-b158", "hf"))
    return meta, Tokenizer.from_gguf_metadata(meta)


def test_model_template_renders_and_encodes_reference_chat():
    meta, tok = b158()
    chat = load_reference("tiny-bitnet-b158", "hf")["chat"]
    tmpl = ChatTemplate.from_gguf_metadata(meta, tok)
    assert tmpl.name == "model"
    text = tmpl.render(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
    assert text == chat["rendered"]
    assert tmpl.encode(chat["messages"]) == chat["ids_with_bos"]


def test_fallback_for_eot_vocab_is_the_2b4t_format():
    meta, tok = b158()
    del meta[Keys.CHAT_TEMPLATE]
    chat = load_reference("tiny-bitnet-b158", "hf")["chat"]
    tmpl = ChatTemplate.from_gguf_metadata(meta, tok)
    assert tmpl.name == "bitnet"
    assert tmpl.render(chat["messages"]) == chat["rendered"]
    assert tmpl.encode(chat["messages"]) == chat["ids_with_bos"]


def test_fallback_without_eot_is_chatml():
    tok = gguf_tokenizer("tiny-llama", "f32")  # no template in the GGUF, no <|eot_id|> in the vocabulary
    tmpl = ChatTemplate.from_gguf_metadata({}, tok)
    assert tmpl.name == "chatml"
    assert tmpl.render(CONVERSATION) == CHATML_EXPECTED


def test_bos_eos_variables():
    tmpl = ChatTemplate(ALPHAMONARCH_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert tmpl.render(CONVERSATION) == ALPHAMONARCH_EXPECTED
    spm = gguf_tokenizer("tiny-bitnet", "f32")  # bos/eos come from the tokenizer: <s>, </s>
    from_meta = ChatTemplate.from_gguf_metadata({Keys.CHAT_TEMPLATE: ALPHAMONARCH_TEMPLATE}, spm)
    assert from_meta.render(CONVERSATION) == ALPHAMONARCH_EXPECTED
    # the template already emits BOS: encode() must not add a second one
    ids = from_meta.encode(CONVERSATION)
    assert ids[0] == spm.bos_id and ids[1] != spm.bos_id


def test_whitespace_control_like_hf():
    assert ChatTemplate(DEEPSEEK_CODER_TEMPLATE).render(CONVERSATION) == DEEPSEEK_CODER_EXPECTED


def test_raise_exception_becomes_value_error():
    tmpl = ChatTemplate(GEMMA_TEMPLATE)
    with pytest.raises(ValueError, match="System role not supported"):
        tmpl.render(CONVERSATION)
    assert tmpl.render(CONVERSATION[1:2]) == "Hello"


def test_strftime_now_and_loop_controls():
    tmpl = ChatTemplate("{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
                        "{% endif %}{{ m['role'] }}{% endfor %}")
    year = datetime.date.today().year
    assert tmpl.render(CONVERSATION) in (f"{year}system", f"{year + 1}system")


def test_sandbox_blocks_unsafe_operations():
    with pytest.raises(ValueError, match="unsafe"):
        ChatTemplate("{% set x = [] %}{{ x.append(1) }}").render(CONVERSATION)
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATION)


@pytest.mark.parametrize("messages,match", [
    ([{"role": "wizard", "content": "hi"}], "role must be one of"),
    ([{"content": "hi"}], "role must be one of"),
    ([{"role": "user", "content": 42}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    (["hello"], "must be an object"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_messages_raise_value_error(messages, match):
    _, tok = b158()
    tmpl = ChatTemplate.from_gguf_metadata({}, tok)
    with pytest.raises(ValueError, match=match):
        tmpl.render(messages)


def test_bad_template_raises_value_error():
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="empty"):
        ChatTemplate("   ")
