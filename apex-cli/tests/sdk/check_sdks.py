"""Drives `apex simulate` with the official OpenAI and Anthropic Python SDKs,
as a user's own code would, and validates every answer strictly with the
SDKs' own types (pydantic `model_validate(..., strict=True)` on the raw JSON
of each body, stream event and batch result: the SDKs themselves build
objects leniently, so a missing required field would pass unnoticed).

Usage: python check_sdks.py BASE_ADDR KEY  (BASE_ADDR like 127.0.0.1:8080)
Exits non-zero, naming the failing call, on the first answer the SDKs cannot
parse or that lacks what Apex relies on (text, usage, cache and reasoning
counts)."""
import json
import sys
import time
import urllib.request

import anthropic
import openai
import pydantic

addr, key = sys.argv[1], sys.argv[2]
context = "The harbour log records tides and storms. " * 200
failures = []


def check(name, condition, detail=""):
    print(("ok   " if condition else "FAIL ") + name + (f": {detail}" if detail and not condition else ""))
    if not condition:
        failures.append(name)


def strict(name, kind, data):
    """Validates raw JSON strictly against an SDK type (a model or a union),
    in pydantic's JSON mode (where an RFC 3339 string is a datetime)."""
    text = data if isinstance(data, str) else json.dumps(data)
    try:
        if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
            value = kind.model_validate_json(text, strict=True)
        else:
            value = pydantic.TypeAdapter(kind).validate_json(text, strict=True)
        check(f"{name}: strict {getattr(kind, '__name__', 'union')}", True)
        return value
    except pydantic.ValidationError as e:
        check(f"{name}: strict {getattr(kind, '__name__', 'union')}", False, str(e)[:800])
        return None


def raw(name, kind, response):
    """A `with_raw_response` answer: its body validated strictly, then parsed."""
    body = response.text
    strict(name, kind, body() if callable(body) else body)
    return response.parse()


def events(path, body, headers):
    """The raw server-sent events of a streamed request, as (event, data)."""
    out = []
    request = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={**headers, "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        name = None
        for line in (raw_line.decode().rstrip("\r\n") for raw_line in r):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, line[6:]))
                name = None
    return out


oa = openai.OpenAI(base_url=f"http://{addr}/v1", api_key=key, max_retries=0)
messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": context}, {"type": "text", "text": "Summarise."}]},
]

# Chat Completions, whole and streamed (the usage chunk comes last).
chat = raw("chat", openai.types.chat.ChatCompletion,
           oa.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages,
                                                        max_completion_tokens=32, prompt_cache_key="sdk-check"))
check("chat: ChatCompletion parsed", isinstance(chat, openai.types.chat.ChatCompletion))
check("chat: text", bool(chat.choices[0].message.content))
check("chat: usage", chat.usage is not None and chat.usage.prompt_tokens > 1000, str(chat.usage))
again = oa.chat.completions.create(model="gpt-4o", messages=messages, max_completion_tokens=32,
                                   prompt_cache_key="sdk-check")
check("chat: cached tokens on the second call", again.usage.prompt_tokens_details.cached_tokens >= 1024,
      str(again.usage))
chunks = list(oa.chat.completions.create(model="gpt-4o", messages=messages, max_completion_tokens=32,
                                         stream=True, stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("chat stream: chunks", len(chunks) > 2, str(len(chunks)))
check("chat stream: text", len(text) > 20, text[:60])
oa_headers = {"Authorization": f"Bearer {key}"}
chat_events = events("/v1/chat/completions", {"model": "gpt-4o", "messages": messages, "max_completion_tokens": 32,
                                              "stream": True, "stream_options": {"include_usage": True}}, oa_headers)
check("chat stream: ends with [DONE]", chat_events[-1][1] == "[DONE]")
for _, data in chat_events[:-1]:
    strict("chat stream chunk", openai.types.chat.ChatCompletionChunk, json.loads(data))
check("chat stream: usage chunk", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32,
      str(chunks[-1]))

# Responses, whole and streamed, on a reasoning model with explicit cache
# breakpoints (GPT-5.6 and later).
inputs = [{"role": "user", "content": [
    {"type": "input_text", "text": context, "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}},
    {"type": "input_text", "text": "Summarise."}]}]
resp = raw("responses", openai.types.responses.Response,
           oa.responses.with_raw_response.create(model="gpt-6.2-sol", instructions="Be brief.", input=inputs,
                                                 max_output_tokens=64, reasoning={"effort": "low"}, store=False,
                                                 prompt_cache_key="sdk-check",
                                                 extra_body={"prompt_cache_options": {"mode": "explicit"}}))
check("responses: Response parsed", isinstance(resp, openai.types.responses.Response))
check("responses: output_text", bool(resp.output_text), repr(resp.output_text))
check("responses: reasoning tokens", resp.usage.output_tokens_details.reasoning_tokens > 0, str(resp.usage))
again = raw("responses (cached)", openai.types.responses.Response,
            oa.responses.with_raw_response.create(model="gpt-6.2-sol", instructions="Be brief.", input=inputs,
                                                  max_output_tokens=64, reasoning={"effort": "low"}, store=False,
                                                  prompt_cache_key="sdk-check",
                                                  extra_body={"prompt_cache_options": {"mode": "explicit"}}))
plain = raw("responses (gpt-4o)", openai.types.responses.Response,
            oa.responses.with_raw_response.create(model="gpt-4o", input="Say something.", max_output_tokens=64))
check("responses (gpt-4o): no cache writes reported", plain.usage.input_tokens_details.cache_write_tokens == 0,
      str(plain.usage))
check("responses: cached tokens", again.usage.input_tokens_details.cached_tokens > 1000, str(again.usage))
with oa.responses.stream(model="gpt-6-luna", input="Say something.", max_output_tokens=512,
                         store=False) as stream:
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    final = stream.get_final_response()
check("responses stream: deltas", len(deltas) > 1, str(len(deltas)))
check("responses stream: final response", final.status in ("completed", "incomplete") and final.usage is not None,
      str(final.status))
check("responses stream: text", "".join(deltas) == final.output_text)
for model in ("gpt-6-luna", "gpt-6.2-sol"):
    for name, data in events("/v1/responses", {"model": model, "input": "Say something.", "max_output_tokens": 512,
                                               "store": False, "stream": True}, oa_headers):
        strict(f"responses stream event {name} ({model})", openai.types.responses.ResponseStreamEvent,
               json.loads(data))

# Anthropic Messages, whole and streamed, with the SDK's own auth (a bearer
# token with SDK 2.0 and later when given auth_token; x-api-key otherwise).
for label, client in [("x-api-key", anthropic.Anthropic(base_url=f"http://{addr}", api_key=key, max_retries=0)),
                      ("bearer", anthropic.Anthropic(base_url=f"http://{addr}", auth_token=key, max_retries=0))]:
    msg = raw(f"messages ({label})", anthropic.types.Message,
              client.messages.with_raw_response.create(
                  model="claude-haiku-4-5", max_tokens=32, system="Be brief.",
                  messages=[{"role": "user", "content": [
                      {"type": "text", "text": context, "cache_control": {"type": "ephemeral"}},
                      {"type": "text", "text": "Summarise."}]}]))
    check(f"messages ({label}): Message parsed", isinstance(msg, anthropic.types.Message))
    check(f"messages ({label}): text", msg.content[-1].type == "text" and bool(msg.content[-1].text))
    check(f"messages ({label}): usage", msg.usage.input_tokens > 0 and msg.usage.output_tokens == 32,
          str(msg.usage))
thinking = raw("messages (thinking)", anthropic.types.Message,
               anthropic.Anthropic(base_url=f"http://{addr}", api_key=key, max_retries=0)
               .messages.with_raw_response.create(
                   model="claude-sonnet-4-5", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1024},
                   messages=[{"role": "user", "content": "Think, then answer."}]))
check("messages: thinking block", [b.type for b in thinking.content] == ["thinking", "text"],
      str([b.type for b in thinking.content]))
with anthropic.Anthropic(base_url=f"http://{addr}", api_key=key, max_retries=0).messages.stream(
        model="claude-opus-5-5", max_tokens=256, messages=[{"role": "user", "content": "Hello"}]) as stream:
    streamed_text = "".join(stream.text_stream)
    final = stream.get_final_message()
check("messages stream: text", bool(streamed_text) and streamed_text == final.content[-1].text)
check("messages stream: usage", final.usage.output_tokens > 0 and final.stop_reason is not None, str(final.usage))
an_headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
for model, extra in (("claude-opus-5-5", {}),
                     ("claude-sonnet-4-5", {"thinking": {"type": "enabled", "budget_tokens": 1024}})):
    for name, data in events("/v1/messages", {"model": model, "max_tokens": 4096, "stream": True,
                                              "messages": [{"role": "user", "content": "Hello"}], **extra},
                             an_headers):
        if name != "ping":
            strict(f"messages stream event {name} ({model})", anthropic.types.RawMessageStreamEvent,
                   json.loads(data))

# Both Batch APIs: a JSONL file uploaded as the SDK sends it, a batch
# created, polled, its output file read; a Message Batch created, polled and
# its results streamed; a cancellation each.
def wait(retrieve, ended):
    deadline = time.time() + 60
    batch = retrieve()
    while not ended(batch) and time.time() < deadline:
        time.sleep(0.1)
        batch = retrieve()
    return batch


lines = "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "gpt-4o", "messages": messages, "max_completion_tokens": 16,
                                     "prompt_cache_key": "sdk-batch"}}) + "\n" for i in range(2))
upload = raw("batch file", openai.types.FileObject,
             oa.files.with_raw_response.create(file=("batch.jsonl", lines.encode()), purpose="batch"))
check("batch: FileObject parsed", isinstance(upload, openai.types.FileObject) and upload.purpose == "batch")
created = raw("batch", openai.types.Batch,
              oa.batches.with_raw_response.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", metadata={"apex_batch": "sdk-check"}))
check("batch: Batch parsed", isinstance(created, openai.types.Batch) and created.metadata["apex_batch"] == "sdk-check")
done = wait(lambda: oa.batches.retrieve(created.id), lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
check("batch: completed", done.status == "completed" and done.request_counts.completed == 2, str(done))
output = [json.loads(line) for line in oa.files.content(done.output_file_id).text.splitlines() if line.strip()]
check("batch: a line per request", sorted(r["custom_id"] for r in output) == ["req-0", "req-1"], str(output)[:200])
raw("batch (completed)", openai.types.Batch, oa.batches.with_raw_response.retrieve(done.id))
for line in output:
    strict("batch output body", openai.types.chat.ChatCompletion, line["response"]["body"])
completion = openai.types.chat.ChatCompletion.model_validate(output[0]["response"]["body"])
check("batch: body is a ChatCompletion", bool(completion.choices[0].message.content) and completion.usage is not None)
check("batch: listed", any(b.id == created.id for b in oa.batches.list(limit=10).data))
another = oa.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
cancelled = oa.batches.cancel(another.id)
check("batch: cancelling", cancelled.status in ("cancelling", "cancelled"), cancelled.status)
cancelled = wait(lambda: oa.batches.retrieve(another.id), lambda b: b.status == "cancelled")
check("batch: cancelled", cancelled.status == "cancelled", cancelled.status)

ac = anthropic.Anthropic(base_url=f"http://{addr}", api_key=key, max_retries=0)
requests = [{"custom_id": f"req-{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [
    {"role": "user", "content": [{"type": "text", "text": context * 4, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                                 {"type": "text", "text": "Summarise."}]}]}} for i in range(2)]
message_batch = raw("message batch", anthropic.types.messages.MessageBatch,
                    ac.messages.batches.with_raw_response.create(requests=requests))
check("message batch: MessageBatch parsed", isinstance(message_batch, anthropic.types.messages.MessageBatch))
ended = wait(lambda: ac.messages.batches.retrieve(message_batch.id), lambda b: b.processing_status == "ended")
check("message batch: ended", ended.processing_status == "ended" and ended.request_counts.succeeded == 2, str(ended))
raw("message batch (ended)", anthropic.types.messages.MessageBatch,
    ac.messages.batches.with_raw_response.retrieve(message_batch.id))
results_url = ac.messages.batches.retrieve(message_batch.id).results_url
with urllib.request.urlopen(urllib.request.Request(results_url, headers=an_headers), timeout=60) as r:
    result_lines = r.read().decode().splitlines()
for line in result_lines:
    if line.strip():
        strict("message batch result", anthropic.types.messages.MessageBatchIndividualResponse, json.loads(line))
results = list(ac.messages.batches.results(message_batch.id))
check("message batch: results", sorted(r.custom_id for r in results) == ["req-0", "req-1"]
      and all(r.result.type == "succeeded" and isinstance(r.result.message, anthropic.types.Message) for r in results),
      str(results)[:300])
check("message batch: each item of one batch writes, none reads another's write",
      all(r.result.message.usage.cache_read_input_tokens == 0
          and r.result.message.usage.cache_creation.ephemeral_1h_input_tokens > 4096 for r in results),
      str(results)[:300])
later = ac.messages.batches.create(requests=requests[:1])
later = wait(lambda: ac.messages.batches.retrieve(later.id), lambda b: b.processing_status == "ended")
read = list(ac.messages.batches.results(later.id))[0].result.message.usage
check("message batch: a later batch reads the cache", read.cache_read_input_tokens > 1000, str(read))
to_cancel = ac.messages.batches.create(requests=requests)
check("message batch: canceling", ac.messages.batches.cancel(to_cancel.id).processing_status in ("canceling", "ended"))
gone = wait(lambda: ac.messages.batches.retrieve(to_cancel.id), lambda b: b.processing_status == "ended")
check("message batch: canceled", gone.request_counts.canceled == 2, str(gone.request_counts))

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all SDK checks passed")
