"""Drives a running ragd through the official `openai` client library.

Usage: check.py BASE_URL  (e.g. http://127.0.0.1:8080). Exits non-zero, with
the reason, when a call fails or an answer is not what the API promises.
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed-on-loopback")

models = [m.id for m in client.models.list().data]
assert len(models) == 2, models
generator, embedder = models

question = "How long does an adult cat sleep each day?"
reply = client.chat.completions.create(
    model=generator,
    messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": question}],
    max_tokens=48,
)
assert reply.object == "chat.completion", reply
text = reply.choices[0].message.content
assert text and text.strip(), reply
assert reply.choices[0].finish_reason in ("stop", "length"), reply
assert reply.usage.completion_tokens > 0, reply.usage
ragd = reply.model_extra["ragd"]
sources = [s["document_id"] for s in ragd["sources"]]
assert "cats" in sources, ragd

# A follow-up with history, streamed.
chunks = list(client.chat.completions.create(
    model=generator,
    messages=[{"role": "user", "content": question},
              {"role": "assistant", "content": text},
              {"role": "user", "content": "When were cats domesticated?"}],
    max_tokens=48,
    stream=True,
))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed.strip(), chunks
assert chunks[-1].choices[0].finish_reason in ("stop", "length"), chunks[-1]
assert "citations" in chunks[-1].model_extra["ragd"], chunks[-1]

emb = client.embeddings.create(model=embedder, input=["Cats purr.", "Rust has a borrow checker."])
assert [d.index for d in emb.data] == [0, 1], emb
assert len(emb.data[0].embedding) == 384, len(emb.data[0].embedding)
assert emb.usage.prompt_tokens > 0, emb.usage

# Errors come back as exceptions, not hangs.
try:
    client.chat.completions.create(model=generator, messages=[{"role": "assistant", "content": "hi"}])
    raise SystemExit("a request without a user question was accepted")
except openai.UnprocessableEntityError:
    pass

print(json.dumps({"openai": openai.__version__, "answer": text, "streamed": streamed, "sources": sources}))
