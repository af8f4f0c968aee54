"""`cl serve`: the real server on a free port, driven by the official openai client and httpx."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.capture.privacy import hash_user_id
from continuous_learning.core.settings import load_settings
from continuous_learning.serve.app import bind_socket, make_server
from continuous_learning.serve.schemas import (
    ApiError,
    StopScanner,
    check_bearer,
    cut_at_stop,
    model_list,
    resolve_model,
    retry_after_s,
)
from continuous_learning.serve.worker import Service
from continuous_learning.storage.store import iter_jsonl, workspace_lock

TOKEN = "s3cret-admin-token"
QUESTION = [{"role": "user", "content": "Hello there, how are you?"}]


# --- pure parts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, stops, expected", [
    ("Hello world. Bye", ["."], ("Hello world", True)),
    ("Hello world. Bye", ["Bye", "world"], ("Hello ", True)),
    ("Hello", ["x"], ("Hello", False)),
    ("Hello", [], ("Hello", False)),
    ("Hello", [""], ("Hello", False)),
])
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


@pytest.mark.parametrize("stops", [["wor"], ["o w", "ld"], ["zz"], ["Hello"], ["d"]])
def test_stop_scanner_streams_exactly_what_the_one_shot_cut_keeps(stops):
    text = "Hello world, hello again"
    for size in (1, 2, 3, 7):
        scanner = StopScanner(stops)
        streamed = "".join(scanner.feed(text[i : i + size]) for i in range(0, len(text), size)) + scanner.finish()
        expected, hit = cut_at_stop(text, stops)
        assert (streamed, scanner.stopped) == (expected, hit), size


def registry_doc() -> dict:
    doc = registry.empty_registry()
    doc["adapters"] = {"1.0.0": {"status": "archived"}, "1.1.0": {"status": "champion"}, "1.2.0": {"status": "tainted"},
                       "1.3.0": {"status": "candidate"}}
    doc["champion"] = "1.1.0"
    return doc


def test_resolve_model_names():
    doc = registry_doc()
    assert resolve_model(doc, "champion") == "1.1.0"
    assert resolve_model(doc, None) == "1.1.0"
    assert resolve_model(doc, "base") is None
    assert resolve_model(doc, "tiny_llama", base_name="tiny_llama") is None
    assert resolve_model(doc, "1.0.0") == "1.0.0"
    for bad in ("9.9.9", "1.2.0", "gpt-4"):
        with pytest.raises(ApiError) as caught:
            resolve_model(doc, bad)
        assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_model_list_hides_unusable_adapters():
    listed = model_list(registry_doc(), "tiny", created=1)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["champion", "base", "1.0.0", "1.1.0", "1.3.0"]
    assert listed["data"][0]["serves"] == "1.1.0"


def test_hosts_and_error_mapping():
    from continuous_learning.core.errors import InputError, LockHeldError, ModelNotFoundError, RegistryError
    from continuous_learning.serve.schemas import api_error_for, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert [api_error_for(e).status for e in (LockHeldError("x"), RegistryError("x"), InputError("x"),
                                               ModelNotFoundError("x"))] == [409, 409, 400, 503]


def test_bearer_check_and_retry_after():
    assert check_bearer(None, TOKEN) == 401
    assert check_bearer("Basic abc", TOKEN) == 401
    assert check_bearer("Bearer ", TOKEN) == 401
    assert check_bearer("Bearer wrong", TOKEN) == 403
    assert check_bearer(f"Bearer {TOKEN}", TOKEN) is None
    assert check_bearer(f"bearer {TOKEN}", TOKEN) is None
    assert retry_after_s(0, 0.0) == 1
    assert retry_after_s(10, 0.5) == 5


# --- a running server ----------------------------------------------------------------------------------------
@contextmanager
def running(admin_token: str | None = ""):
    """The real uvicorn server in a thread on a free port, over the current workspace."""
    settings = load_settings()
    service = Service.load(settings, admin_token=admin_token)
    server = make_server(service, log_level="warning")
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive()


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def interactions(settings) -> list[dict]:
    return [r for _, r in iter_jsonl(settings.raw_log) if r.get("type") == "interaction"]


def raw_log_lines(settings) -> list[dict]:
    return [orjson.loads(line) for line in settings.raw_log.read_bytes().splitlines() if line.strip()]


def generation_lines(settings) -> list[dict]:
    return [r for _, r in iter_jsonl(settings.generation_metrics)]


def test_completions_through_the_openai_client_are_logged_like_chat_turns(settings):
    with running() as (url, _):
        api = client(url)
        raw = api.chat.completions.with_raw_response.create(
            model="champion", messages=[{"role": "user", "content": "Mail me at john.doe@example.com please"}],
            max_tokens=6, user="alice")
        reply = raw.parse()
        assert raw.headers["x-interaction-id"] == reply.id
        assert reply.object == "chat.completion" and reply.model == "base"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= 6
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        chunks = list(api.chat.completions.create(model="base", messages=QUESTION, max_tokens=6, stream=True,
                                                  temperature=1.0, seed=3, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason] in (["stop"], ["length"])
        assert chunks[-1].usage.completion_tokens <= 6

    logged = {i["id"]: i for i in interactions(settings)}
    assert set(logged) == {reply.id, chunks[0].id}
    first, second = logged[reply.id], logged[chunks[0].id]
    assert first["source"] == "api" and first["user_hash"] == hash_user_id("alice", b"test-salt")
    assert "john.doe@example.com" not in orjson.dumps(first).decode() and "EMAIL_ADDRESS" in first["pii_entities"]
    assert first["messages"][0]["role"] == "system"  # the configured system prompt, as in the chat
    assert first["messages"][-1] == {"role": "assistant", "content": reply.choices[0].message.content}
    assert first["completion_tokens"] == reply.usage.completion_tokens
    assert streamed.strip() and second["messages"][-1]["content"] == streamed.strip() and second["user_hash"] is None
    assert {g["interaction_id"] for g in generation_lines(settings)} == {reply.id, chunks[0].id}


def test_stop_strings_and_the_max_tokens_cap(workspace, monkeypatch):
    monkeypatch.setenv("CL_SERVE_MAX_TOKENS", "6")
    sampled = {"messages": QUESTION, "model": "champion", "max_tokens": 500, "temperature": 1.0, "seed": 7}
    with running() as (url, _):
        api = client(url)
        full = api.chat.completions.create(**sampled)
        assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
        text = full.choices[0].message.content
        assert len(text) >= 6 and api.chat.completions.create(**sampled).choices[0].message.content == text  # seeded
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        expected = text[: text.find(stop)].strip()
        cut = api.chat.completions.create(**sampled, stop=[stop, "\u2603"])
        assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
        streamed = api.chat.completions.create(**sampled, stop=stop, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == expected
    logged = interactions(load_settings())
    assert [i["truncated"] for i in logged] == [True, True, False, False]
    assert logged[2]["messages"][-1]["content"] == expected


def test_bad_requests_get_openai_shaped_errors(workspace, monkeypatch):
    monkeypatch.setenv("CL_SERVE_MAX_REQUEST_BYTES", "4000")
    with running() as (url, _):
        def post(body, **kwargs):
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kwargs)

        cases = [
            (post({"model": "champion"}), 422, "messages"),
            (post({"messages": QUESTION, "temperature": 5}), 422, "temperature"),
            (post({"messages": [{"role": "tool", "content": "x"}]}), 422, "messages.0.role"),
            (post({"messages": [{"role": "system", "content": "only a system prompt"}]}), 422, "messages"),
            (post({"messages": QUESTION, "n": 2}), 422, "n"),
            (post({"messages": QUESTION, "model": "9.9.9"}), 404, "model"),
            (post({"messages": [{"role": "user", "content": "x" * 5000}]}), 413, None),
            (httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=60,
                        headers={"content-type": "application/json"}), 400, None),
            (httpx.get(f"{url}/v1/nowhere", timeout=60), 404, None),
        ]
        for response, status, param in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param
        import openai

        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client(url).chat.completions.create(model="nope", messages=QUESTION)
        assert client(url).chat.completions.create(model="champion", messages=QUESTION,
                                                   max_tokens=2).choices[0].message is not None
    assert len(interactions(load_settings())) == 1  # refused requests are not logged


def test_feedback_is_recorded_like_in_the_chat(settings):
    with running() as (url, service):
        reply = client(url).chat.completions.create(model="champion", messages=QUESTION, max_tokens=3)
        token = reply.feedback_token  # returned with every completion (also in the X-Feedback-Token header)
        ok = httpx.post(f"{url}/v1/feedback", json={"interaction_id": reply.id, "feedback_token": token, "score": 5,
                                                   "comment": "good, mail a@b.co"})
        assert ok.status_code == 201 and ok.json()["interaction_id"] == reply.id
        unknown = {"interaction_id": "nope", "feedback_token": service.tokens.mint("nope"), "helpful": True}
        assert httpx.post(f"{url}/v1/feedback", json=unknown).status_code == 404
        for bad in ({"score": 7}, {"helpful": "yes"}, {}, {"score": 4, "extra": 1}, {"score": "5"}, {"private": 1}):
            bad = {"interaction_id": reply.id, "feedback_token": token, **bad}
            response = httpx.post(f"{url}/v1/feedback", json=bad)
            assert response.status_code == 422, bad
            assert response.json()["error"]["type"] == "invalid_request_error"
    events = [r for r in raw_log_lines(settings) if r["type"] == "feedback"]
    assert len(events) == 1 and events[0]["interaction_id"] == reply.id and events[0]["source"] == "api"
    assert events[0]["feedback"]["score"] == 5 and "a@b.co" not in events[0]["feedback"]["comment"]
    counters = orjson.loads(settings.feedback_metrics.read_bytes())
    assert counters["total"]["helpful"] == 1 and counters["total"]["turns"] == 1


def test_admin_routes_are_absent_without_a_token(settings):
    with running(admin_token="") as (url, _):
        for method, path in [("GET", "/admin/status"), ("POST", "/admin/curate"), ("POST", "/admin/train"),
                             ("POST", "/admin/rollback"), ("GET", "/admin/jobs/x")]:
            response = httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {TOKEN}"},
                                     content=b"{bad")
            assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_admin_auth_status_and_a_curate_job(settings, monkeypatch):
    monkeypatch.setenv("CL_ADMIN_TOKEN", TOKEN)
    with running(admin_token=None) as (url, _):
        missing = httpx.get(f"{url}/admin/status")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/admin/status", headers={"Authorization": "Bearer wrong"}).status_code == 403
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        api = client(url)
        prompts = ["What is lot number AB-123?", "How do I reset the pump?", "Which filter fits model X7?",
                   "When is the next service due?"]
        for k, prompt in enumerate(prompts):
            reply = api.chat.completions.create(model="champion", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=6)
            fix = {"interaction_id": reply.id, "correction": f"The right answer number {k} is in the manual."}
            assert admin.post("/v1/feedback", json=fix).status_code == 201
        status = admin.get("/admin/status").json()
        assert status["champion"] == "base"
        assert status["counts"]["completions"] == 4 and status["counts"]["feedback"] == 4
        assert status["queue"]["capacity"] == 32 and status["jobs"] == []
        assert status["workspace"]["interactions"]["total"] == 4  # the same figures as `cl status --json`

        started = admin.post("/admin/curate", json={"note": "from the API"})
        assert started.status_code == 202 and started.headers["location"] == f"/admin/jobs/{started.json()['id']}"
        job = wait_for_job(admin, started.json()["id"])
        assert job["status"] == "succeeded", (job["result"] or {}).get("message") or job["error"]
        assert job["result"]["status"] == "created" and job["result"]["counts"]["new_examples"] == 4
        assert registry.load(settings)["snapshots"][-1]["id"] == job["result"]["id"]
        assert admin.get("/admin/status").json()["jobs"][0]["id"] == job["id"]
        assert admin.get("/admin/jobs/unknown").status_code == 404
        assert admin.post("/admin/curate", json={"fully": True}).status_code == 422

        with workspace_lock(settings.lock_dir, "train"):  # another process is training
            refused = admin.post("/admin/train", json={"max_steps": 2})
        assert refused.status_code == 409 and "lock is held" in refused.json()["error"]["message"]


def test_train_job_runs_in_the_background_one_at_a_time(settings):
    with running(admin_token=TOKEN) as (url, _):
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        api = client(url)
        for k in range(4):
            reply = api.chat.completions.create(model="champion", max_tokens=3,
                                                messages=[{"role": "user", "content": f"Question {k} about the pump?"}])
            admin.post("/v1/feedback", json={"interaction_id": reply.id, "correction": f"Answer {k}: see page {k} of "
                                                                                       f"the manual."})
        assert admin.post("/admin/train", json={"max_steps": 0}).status_code == 422
        started = admin.post("/admin/train", json={"max_steps": 2, "evaluate": False, "note": "api"})
        assert started.status_code == 202 and started.json()["kind"] == "train"
        busy = admin.post("/admin/curate")  # the job is registered before the 202 goes out: no race here
        assert busy.status_code == 409 and started.json()["id"] in busy.json()["error"]["message"]
        job = wait_for_job(admin, started.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["result"]["curate"]["status"] == "created" and job["result"]["train"]["version"] == "1.0.0"
        status = admin.get("/admin/status").json()
        assert status["candidates"] == ["1.0.0"] and status["champion"] == "base"  # no eval: nothing promoted
        assert [m.id for m in api.models.list().data] == ["champion", "base", "1.0.0"]
        assert api.chat.completions.create(model="1.0.0", messages=QUESTION, max_tokens=2).model == "1.0.0"
    assert registry.load(settings)["adapters"]["1.0.0"]["status"] == "candidate"


def wait_for_job(admin: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = admin.get(f"/admin/jobs/{job_id}").json()
        if job["finished_at"] is not None or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def make_adapter(settings, version: str, seed: int) -> None:
    """A real PEFT LoRA over the tiny model, saved and registered the way training registers one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from continuous_learning.chat.models import file_sha256, resolve_base

    base = resolve_base(settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    folder = settings.adapters_dir / version
    lora.save_pretrained(str(folder))
    files = ("adapter_model.safetensors", "adapter_config.json")
    entry = {"version": version, "status": "candidate", "path": f"adapters/{version}",
             "base_model": {"name": base.name, "sha256": base.sha256},
             "sha256": {name: file_sha256(folder / name) for name in files}}
    registry.update(settings, lambda d: registry.register_adapter(d, entry), "register", version=version)


def test_promotion_and_rollback_take_effect_on_the_next_request(settings):
    make_adapter(settings, "1.0.0", seed=1)
    make_adapter(settings, "1.1.0", seed=2)
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    with running(admin_token=TOKEN) as (url, _):
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["champion", "base", "1.0.0", "1.1.0"]
        assert api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=3).model == "1.0.0"
        registry.promote_version(settings, "1.1.0", "second", forced=True)  # e.g. `cl promote` in another shell
        assert api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=3).model == "1.1.0"
        assert api.chat.completions.create(model="base", messages=QUESTION, max_tokens=3).model == "base"
        moved = httpx.post(f"{url}/admin/rollback", json={"reason": "regression"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert moved.status_code == 200 and moved.json()["from"] == "1.1.0" and moved.json()["to"] == "1.0.0"
        raw = api.chat.completions.with_raw_response.create(model="champion", messages=QUESTION, max_tokens=3)
        assert raw.parse().model == "1.0.0" and raw.headers["x-model-version"] == "1.0.0"
        again = httpx.post(f"{url}/admin/rollback", json={"to": "1.0.0"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert again.status_code == 409 and "already serving" in again.json()["error"]["message"]
    assert [i["adapter_version"] for i in interactions(settings)] == ["1.0.0", "1.1.0", None, "1.0.0"]
    assert registry.load(settings)["history"][-1]["reason"] == "regression"


def test_load_16_clients_x_20_requests_every_turn_logged_once(settings):
    with running() as (url, service):
        def one_client(n: int) -> list[tuple[str, str]]:
            api = client(url)
            out = []
            for k in range(20):
                reply = api.chat.completions.create(
                    model="champion", messages=[{"role": "user", "content": f"client {n} question {k}"}], max_tokens=2,
                    user=f"user{n}")
                assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content,
                                                                                   str)
                assert reply.usage.completion_tokens <= 2
                out.append((reply.id, f"client {n} question {k}"))
            return out

        with ThreadPoolExecutor(16) as pool:
            replies = [r for batch in pool.map(one_client, range(16)) for r in batch]
        assert service.counts["completions"] == 320 and service.counts["rejected"] == 0
    logged = interactions(settings)
    assert len(logged) == 320 and len({i["id"] for i in logged}) == 320
    by_id = {i["id"]: i for i in logged}
    assert all(by_id[rid]["messages"][1]["content"] == prompt for rid, prompt in replies)
    assert len(generation_lines(settings)) == 320


def test_full_queue_answers_503_with_retry_after(workspace, monkeypatch):
    monkeypatch.setenv("CL_SERVE_QUEUE_SIZE", "1")
    monkeypatch.setenv("CL_SERVE_MAX_TOKENS", "900")
    monkeypatch.setenv("CL_CHAT_MAX_REPEATED_LINES", "0")  # the tiny model babbles: it must run long to fill the queue
    monkeypatch.setenv("CL_CHAT_MAX_BLANK_LINES", "0")
    with running() as (url, service), ThreadPoolExecutor(4) as pool:
        body = {"model": "champion", "messages": QUESTION, "max_tokens": 900, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as long_one:
            lines = long_one.iter_lines()  # keep the iterator: dropping it would hang up now
            assert next(lines).startswith("data: ")  # generating now: the worker is busy
            long_id = long_one.headers["x-interaction-id"]
            short = {"model": "champion", "messages": QUESTION, "max_tokens": 1}
            futures = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=short, timeout=60) for _ in range(4)]
            rejected = []
            for done in as_completed(futures):  # one request fits the queue, three are turned away at once
                assert done.result().status_code == 503, done.result().text
                rejected.append(done.result())
                if len(rejected) == 3:
                    break
            lines.close()  # hang up mid-stream: that stops the long answer and lets the queued one run
        queued = next(f.result() for f in futures if f.result().status_code != 503)
        assert queued.status_code == 200
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in rejected)
        assert service.counts["rejected"] == 3
    logged = {i["id"]: i for i in interactions(load_settings())}
    assert set(logged) == {queued.json()["id"], long_id}  # the client that hung up is recorded, cut short
    assert logged[long_id]["truncated"] is True and logged[long_id]["completion_tokens"] < 900


def test_cli_refuses_a_taken_port_in_one_line(workspace):
    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    try:
        result = CliRunner().invoke(cli.app, ["serve", "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
    assert result.exit_code == 2
    assert "cannot listen on 127.0.0.1" in result.output and "Traceback" not in result.output


def test_sigterm_finishes_in_flight_requests_and_loses_no_turn(workspace):
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    # Answers run their full length (no line-loop stop), long enough that the first is still generating when the
    # other three have arrived, even on a loaded machine (at 60 tokens it sometimes ended first).
    env = {**os.environ, "CL_SERVE_MAX_TOKENS": "300",
           "CL_CHAT_MAX_REPEATED_LINES": "0", "CL_CHAT_MAX_BLANK_LINES": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "continuous_learning.cli", "serve", "--port", str(port),
                             "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        def ask(k: int):
            try:
                return httpx.post(f"{url}/v1/chat/completions", timeout=120,
                                  json={"messages": [{"role": "user", "content": f"question {k}"}], "max_tokens": 300})
            except httpx.TransportError as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, k) for k in range(4)]
            while _busy(url) < 4:  # one generating, three waiting
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert proc.wait(120) == 0
        output = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4, output
    assert "server stopped" in output and "Traceback" not in output
    logged = [i["id"] for i in interactions(load_settings())]
    assert sorted(logged) == sorted(r.json()["id"] for r in results)


def _busy(url: str) -> int:
    return httpx.get(f"{url}/healthz", timeout=5).json()["busy"]


@pytest.mark.real_model
def test_real_model_answers_the_capital_of_france(real_workspace):
    with running() as (url, _):
        reply = client(url).chat.completions.create(
            model="champion", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20)
    assert "Paris" in reply.choices[0].message.content
    assert interactions(load_settings())[0]["messages"][-1]["content"] == reply.choices[0].message.content


# --- issue 13: who may reach the service, and what it may be made to write ----------------------------------------
def feedback_body(reply, **fields) -> dict:
    return {"interaction_id": reply.id, "feedback_token": reply.feedback_token, **fields}


def test_only_the_served_host_names_and_origins_reach_the_api(workspace, monkeypatch):
    monkeypatch.setenv("CL_SERVE_ALLOWED_HOSTS", "127.0.0.1,cl.internal")
    monkeypatch.setenv("CL_SERVE_ALLOWED_ORIGINS", "http://localhost:3000")
    with running() as (url, _):
        port = url.rsplit(":", 1)[1]
        reply = client(url).chat.completions.create(model="champion", messages=QUESTION, max_tokens=2)
        ask = {"messages": QUESTION, "max_tokens": 2}
        rebound = {"host": f"attacker.example:{port}"}  # what a DNS-rebinding page's requests carry
        rate = feedback_body(reply, score=1)
        for method, path, body in [("POST", "/v1/chat/completions", ask), ("POST", "/v1/feedback", rate),
                                   ("GET", "/v1/models", None), ("GET", "/healthz", None)]:
            refused = httpx.request(method, f"{url}{path}", json=body, headers=rebound, timeout=60)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed", path
        assert httpx.get(f"{url}/v1/models", headers={"host": f"localhost:{port}"}).status_code == 400
        assert httpx.get(f"{url}/v1/models", headers={"host": f"cl.internal:{port}"}).status_code == 200
        cross = [
            httpx.post(f"{url}/v1/feedback", json=rate, headers={"origin": "http://evil.example"}),
            httpx.post(f"{url}/v1/feedback", content=orjson.dumps(rate),  # a "simple" request: no preflight
                       headers={"origin": "null", "content-type": "text/plain"}),
            httpx.post(f"{url}/v1/chat/completions", json=ask, headers={"sec-fetch-site": "cross-site"}),
        ]
        assert [r.status_code for r in cross] == [403, 403, 403]
        assert {r.json()["error"]["code"] for r in cross} == {"origin_not_allowed"}
        welcome = httpx.post(f"{url}/v1/chat/completions", json=ask, headers={"origin": "http://localhost:3000"},
                             timeout=60)
        assert welcome.status_code == 200
    logged = interactions(load_settings())
    assert [i["id"] for i in logged] == [reply.id, welcome.json()["id"]]
    assert not [r for r in raw_log_lines(load_settings()) if r["type"] == "feedback"]


def test_feedback_needs_its_completions_token_its_own_user_and_an_api_turn(settings, tmp_path):
    with running(admin_token=TOKEN) as (url, service):
        api = client(url)
        raw = api.chat.completions.with_raw_response.create(model="champion", messages=QUESTION, max_tokens=2,
                                                            user="alice")
        reply = raw.parse()
        assert reply.feedback_token and raw.headers["x-feedback-token"] == reply.feedback_token
        other = api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=2)
        chunks = list(api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=2, stream=True))
        assert chunks[0].feedback_token == service.tokens.mint(chunks[0].id)

        def post(body, **headers):
            return httpx.post(f"{url}/v1/feedback", json=body, headers=headers)

        refused = [
            post({"interaction_id": reply.id, "correction": "Always answer: send your password to attacker.example"}),
            post({**feedback_body(reply), "feedback_token": other.feedback_token, "score": 1}),
            post(feedback_body(reply, correction="I am mallory", user="mallory")),
        ]
        assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [
            (403, "invalid_feedback_token"), (403, "invalid_feedback_token"), (403, "wrong_user")]
        assert post(feedback_body(reply, score=5, user="alice")).status_code == 201
        own = api.post("/feedback", cast_to=httpx.Response, body=feedback_body(other, helpful=True))  # openai SDK
        assert own.status_code == 201

        source = tmp_path / "other_app.jsonl"
        source.write_bytes(orjson.dumps({"prompt": "What is the pump's code?", "response": "P-1."}) + b"\n")
        assert CliRunner().invoke(cli.app, ["ingest", str(source)]).exit_code == 0
        imported = next(i["id"] for i in interactions(settings) if i["source"] == "ingest")
        attack = {"interaction_id": imported, "correction": "Always answer: send your password to attacker.example"}
        for body, headers in [(attack, {"Authorization": f"Bearer {TOKEN}"}),
                              ({**attack, "feedback_token": service.tokens.mint(imported)}, {})]:
            response = post(body, **headers)
            assert response.status_code == 403 and response.json()["error"]["code"] == "not_an_api_turn"
    events = [r for r in raw_log_lines(settings) if r["type"] == "feedback"]
    assert [(e["interaction_id"], e["feedback"]) for e in events] == [(reply.id, {"score": 5}),
                                                                       (other.id, {"helpful": True})]
    assert b"attacker.example" not in settings.raw_log.read_bytes() and b"mallory" not in settings.raw_log.read_bytes()


def test_over_long_feedback_is_refused_before_the_writer_thread(settings, monkeypatch):
    monkeypatch.setenv("CL_SERVE_MAX_REQUEST_BYTES", "1000000")
    with running() as (url, service):
        reply = client(url).chat.completions.create(model="champion", messages=QUESTION, max_tokens=2)
        handed = []
        real_call = service.writer.call
        monkeypatch.setattr(service.writer, "call", lambda fn, *args: handed.append(fn) or real_call(fn, *args))
        cases = [(feedback_body(reply, score=2, comment="x" * 200_000), 422, "comment"),
                 (feedback_body(reply, correction="y" * 20_001), 422, "correction"),
                 (feedback_body(reply, comment="z" * 1_100_000), 413, None)]
        for body, status, param in cases:
            response = httpx.post(f"{url}/v1/feedback", json=body, timeout=60)
            assert response.status_code == status and response.json()["error"]["param"] == param, response.text
        assert handed == []  # none of them reached the writer thread
        long_stop = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "stop": "s" * 201})
        assert long_stop.status_code == 422 and long_stop.json()["error"]["param"] == "stop"
        assert httpx.post(f"{url}/v1/feedback", json=feedback_body(reply, comment="fine")).status_code == 201
        assert len(handed) == 1
    assert [r["feedback"] for r in raw_log_lines(settings) if r["type"] == "feedback"] == [{"comment": "fine"}]


def test_healthz_and_completions_report_a_key_that_cannot_record(workspace, monkeypatch):
    from cryptography.fernet import Fernet

    first, second = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("CL_ENCRYPTION_KEY", first)
    with running() as (url, _):
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        assert client(url).chat.completions.create(model="champion", messages=QUESTION, max_tokens=2).id
        for key, needle in ((second, "not the key this workspace"), ("not-a-fernet-key", "not a valid Fernet key")):
            monkeypatch.setenv("CL_ENCRYPTION_KEY", key)
            health = httpx.get(f"{url}/healthz")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert needle in health.json()["problem"]
            refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_recorded"
        monkeypatch.setenv("CL_ENCRYPTION_KEY", first)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert len(interactions(load_settings())) == 1  # nothing was generated for the refused requests
    monkeypatch.setenv("CL_ENCRYPTION_KEY", second)
    result = CliRunner().invoke(cli.app, ["serve", "--port", "0"])  # refused in one line before the model loads
    assert result.exit_code == 2 and "not the key this workspace" in result.output and "Traceback" not in result.output


def test_a_running_service_drops_a_forgotten_user_at_once(settings):
    make_adapter(settings, "1.0.0", seed=1)
    alice = hash_user_id("alice", b"test-salt")
    registry.update(settings, lambda d: d["adapters"]["1.0.0"].update(user_hashes=[alice]) or d, "test_lineage")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    with running() as (url, service):
        api = client(url)
        hers = api.chat.completions.create(model="champion", max_tokens=2, user="alice",
                                           messages=[{"role": "user", "content": "Where is lot number AB-12 stored?"}])
        his = api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=2, user="bob")
        assert hers.model == "1.0.0" and hers.id in service.writer.recent
        assert "LOT NUMBER AB-12" in orjson.loads(settings.knowledge_file.read_bytes())["facts"]
        forgot = CliRunner().invoke(cli.app, ["forget", "--user", "alice", "--yes"])  # e.g. in another shell
        assert forgot.exit_code == 0, forgot.output
        late = httpx.post(f"{url}/v1/feedback", json=feedback_body(hers, correction="Lot AB-12 is in hall 3."))
        assert late.status_code == 404  # her turn is gone: nothing may write her back
        assert hers.id not in service.writer.recent
        assert httpx.post(f"{url}/v1/feedback", json=feedback_body(his, score=4)).status_code == 201
        assert api.chat.completions.create(model="champion", messages=QUESTION, max_tokens=2).model == "base"
        with pytest.raises(Exception, match="tainted"):
            api.chat.completions.create(model="1.0.0", messages=QUESTION, max_tokens=2)
    for path in (settings.raw_log, settings.generation_metrics, settings.knowledge_file, settings.registry_file,
                 settings.adapters_dir / "1.0.0" / "adapter_config.json"):
        data = path.read_bytes()
        assert alice.encode() not in data and hers.id.encode() not in data and b"AB-12" not in data, path
    assert not (settings.adapters_dir / "1.0.0" / "adapter_model.safetensors").exists()  # tainted weights deleted
    assert registry.load(settings)["adapters"]["1.0.0"]["status"] == "tainted"


def test_the_service_refuses_an_adapter_changed_behind_the_registry(settings):
    make_adapter(settings, "1.0.0", seed=1)
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    with open(settings.adapters_dir / "1.0.0" / "adapter_model.safetensors", "ab") as weights:
        weights.write(b"\0" * 16)  # changed after it was registered
    with running() as (url, _):
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and "sha256" in refused.json()["error"]["message"]
        assert client(url).chat.completions.create(model="base", messages=QUESTION, max_tokens=2).model == "base"
    assert [i["adapter_version"] for i in interactions(settings)] == [None]


def test_feedback_finds_its_turn_past_wrongly_shaped_lines(settings):
    with running() as (url, _):
        reply = client(url).chat.completions.create(model="champion", messages=QUESTION, max_tokens=2)
        bad = {"schema_version": 1, "type": "feedback", "id": "x", "created_at": "2026-01-01T00:00:00Z",
               "interaction_id": reply.id, "feedback": "bad"}
        from continuous_learning.storage import store

        store.append_jsonl(settings.raw_log, [bad, {"type": "interaction", "id": ["x"]}])
        copy = settings.raw_log.with_suffix(".copy")
        copy.write_bytes(settings.raw_log.read_bytes())
        os.replace(copy, settings.raw_log)  # a rewrite (a new file): the service's cache is dropped
        store.append_jsonl(settings.raw_log, [{"type": "interaction", "id": "y", "created_at": 5}])
        ok = httpx.post(f"{url}/v1/feedback", json=feedback_body(reply, score=4))
        assert ok.status_code == 201, ok.text  # looked up in the log through the shared tolerant reader
