"""Chat templates: byte-level roles, a checkpoint's Jinja template, exact message boundaries."""

import json

import pytest

from engine.text.chat import ChatTemplate, ChatTemplateError
from engine.text.tokenizer import ByteTokenizer, load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ☃"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]


def test_byte_template_tokens_and_boundaries():
    tok = ByteTokenizer()
    r = ChatTemplate(tok).render(MESSAGES)
    end = tok.special_id("<|end|>")
    assert r.token_ids[0] == tok.special_id("<|system|>") and r.token_ids[-1] == tok.special_id("<|assistant|>")
    ends = [b for b in r.boundaries[:-1] if r.token_ids[b - 1] == end]
    assert len(ends) == 4 and r.boundaries[-1] == len(r.token_ids)
    reply_end = [b for b in r.boundaries if b not in ends and b != len(r.token_ids)]
    assert [r.token_ids[b] for b in reply_end] == [end]  # the assistant text also ends a cacheable prefix
    # A conversation's rendering starts with the rendering of its first messages: boundaries are reusable.
    shorter = ChatTemplate(tok).render(MESSAGES[:2], add_generation_prompt=False)
    assert r.token_ids[: len(shorter.token_ids)] == shorter.token_ids
    assert end in r.stop_token_ids and tok.eos_id in r.stop_token_ids
    with pytest.raises(ChatTemplateError):
        ChatTemplate(tok).render([{"role": "wizard", "content": "x"}])


def test_checkpoint_jinja_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["hello world system user assistant brief more"] * 20, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    tok = load_tokenizer(tmp_path)
    chat = ChatTemplate.for_checkpoint(tok, tmp_path)
    r = chat.render(MESSAGES)
    assert tok.decode(r.token_ids) == chat._text_of(MESSAGES, True).replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.special_id("<|im_end|>") in r.token_ids and r.stop_token_ids == [tok.special_id("<|im_end|>")]
    assert len(r.boundaries) == len(MESSAGES) + 1 and r.boundaries == sorted(r.boundaries)
    first_two = chat.render(MESSAGES[:2], add_generation_prompt=False)
    assert r.token_ids[: r.boundaries[1]] == first_two.token_ids


def test_template_errors_are_chat_template_errors():
    strict = ChatTemplate(ByteTokenizer(), "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                           "{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate(ByteTokenizer(), "{{ messages[0]['content'] | no_such_filter }}")
    undefined = ChatTemplate(ByteTokenizer(), "{{ messages[0]['content'].nope() }}")
    with pytest.raises(ChatTemplateError):
        undefined.render([{"role": "user", "content": "x"}])
