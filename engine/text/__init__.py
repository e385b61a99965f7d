"""Text in and out of the model: tokenizers, chat templates and stop strings.

- :mod:`engine.text.tokenizer`: the byte-level default and Hugging Face
  ``tokenizer.json`` files behind one interface, and UTF-8-safe streaming;
- :mod:`engine.text.chat`: chat templates, messages -> token ids with the
  offsets of message boundaries (the prefix cache's keys);
- :mod:`engine.text.stops`: stop strings found across token boundaries.
"""
