"""`nmt serve`: the HTTP API on the toy model, through FastAPI's test client and for real."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from nmt.checkpoint import load_model  # noqa: E402
from nmt.cli import app as cli_app  # noqa: E402
from nmt.evaluate import add_to_report, score  # noqa: E402
from nmt.serve import ServeLimits, create_app  # noqa: E402
from nmt.translate import SearchOptions, Translator  # noqa: E402

LIMITS = ServeLimits(max_sentences=8, max_chars=40, max_batch=4, max_wait_ms=20)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_model(trained_run / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(loaded, LIMITS)) as c:
        yield c


def reference(loaded, lines, **options):
    """What `nmt translate` gives for these lines with these options."""
    opts = SearchOptions.from_recipe(loaded.recipe.decode, **options)
    return Translator(loaded, opts).translate_lines(lines)


def toy_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(10)}" for _ in range(rng.randint(1, 7))) for _ in range(n)]


@pytest.mark.parametrize("options, search", [
    ({}, {}),
    ({"beam_size": 1}, {"beam_size": 1}),
    ({"beam_size": 4, "length_penalty": 0.0}, {"beam_size": 4, "length_penalty": 0.0}),
    ({"max_len_ratio": 0.0}, {"max_len_a": 0.0}),
])
def test_translations_equal_batch_translation(client, loaded, options, search):
    lines = ["w1 w2 w3", "", "w4 w5", "  w6   w7 ", "w8 w9 w0 w1 w2 w3"]
    response = client.post("/translate", json={"text": lines, **options})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["translations"] == reference(loaded, lines, **search)
    assert body["model"].endswith("best.pt") and body["took_ms"] >= 0 and "nbest" not in body


def test_nbest_gives_ranked_candidates(client, loaded):
    body = client.post("/translate", json={"text": ["w1 w2", "w3"], "nbest": 3}).json()
    assert [len(n) for n in body["nbest"]] == [3, 3]
    best = [n[0]["translation"] for n in body["nbest"]]
    assert body["translations"] == best == reference(loaded, ["w1 w2", "w3"], beam_size=3)
    for candidates in body["nbest"]:
        scores = [c["score"] for c in candidates]
        assert scores == sorted(scores, reverse=True)


def test_empty_request_translates_nothing(client):
    assert client.post("/translate", json={"text": []}).json()["translations"] == []


def test_concurrent_requests_each_get_their_own_answers(loaded):
    # 48 requests from 12 threads, of 1 to 4 sentences and three kinds of options
    option_kinds = [{}, {"beam_size": 1}, {"beam_size": 3, "nbest": 2}]
    requests = [(toy_sentences(1 + k % 4, seed=k), option_kinds[k % 3]) for k in range(48)]
    expected = [
        reference(loaded, lines, **{k: v for k, v in options.items() if k != "nbest"}) for lines, options in requests
    ]
    answers: list = [None] * len(requests)

    with TestClient(create_app(loaded, LIMITS)) as client:
        def worker(start: int):
            for k in range(start, len(requests), 12):
                lines, options = requests[k]
                answers[k] = client.post("/translate", json={"text": lines, **options}).json()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        served = client.get("/health").json()["served"]
    for (lines, options), want, got in zip(requests, expected, answers):
        assert got["translations"] == want, (lines, options)
        assert ("nbest" in got) == ("nbest" in options)
    assert served["requests"] == len(requests)
    assert served["sentences"] == sum(len(lines) for lines, _ in requests)
    assert served["largest_batch"] <= LIMITS.max_batch


@pytest.mark.parametrize("body, status, detail", [
    ({"text": ["w1"] * 9}, 413, "9 sentences, over the limit of 8"),
    ({"text": ["w1", "w1 " * 14]}, 413, "text[1]: 42 characters, over the limit of 40"),
    ({"text": "w1 w2"}, 422, "list_type"),
    ({"text": ["w1", 7]}, 422, "string_type"),
    ({"text": ["w1"], "beam": 2}, 422, "extra_forbidden"),
    ({"text": ["w1"], "beam_size": 0}, 422, "greater_than_equal"),
    ({"text": ["w1"], "beam_size": 33}, 422, "less_than_equal"),
    ({"text": ["w1"], "max_len_ratio": -1}, 422, "greater_than_equal"),
    ({"beam_size": 2}, 422, "missing"),
    ([["w1"]], 422, "model_attributes_type"),
    ({"text": ["w1"], "beam_size": "3"}, 422, "int_type"),
    ({"text": ["w1"], "beam_size": True}, 422, "int_type"),
    ({"text": ["w1"], "length_penalty": float("nan")}, 422, "finite_number"),
    ({"text": ["w1"], "nbest": float("inf")}, 422, "int_type"),
    ({"text": [float("nan")], "extra": float("-inf")}, 422, "extra_forbidden"),
    ({"text": "w1 " * 5000}, 422, "list_type"),
])
def test_limits_and_bad_requests_are_json_errors(client, body, status, detail):
    # NaN and infinities are what Python's JSON parser (FastAPI's) accepts beyond the standard
    content = json.dumps(body).encode()
    response = client.post("/translate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert detail in json.dumps(response.json()["detail"])
    assert len(response.content) < 1000  # the bad input is not echoed back


def test_strings_a_file_cannot_hold_are_translated(client, loaded):
    raw = b'{"text": ["w1 \\ud800 w2", "w3\\u0000 w4", "\\udfff"]}'
    response = client.post("/translate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["translations"] == reference(loaded, ["w1 \ufffd w2", "w3 w4", "\ufffd"])


def test_at_the_limits_is_accepted(client):
    lines = [" w1" * 13 + " "] * 8  # 8 sentences of 40 characters
    assert len(lines[0]) == 40
    assert client.post("/translate", json={"text": lines}).status_code == 200


@pytest.mark.parametrize("content, headers", [
    (b'{"text": ["w1"', {"content-type": "application/json"}),
    (b"\xff\xfe not utf-8", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b'{"text": ["w1"]}', {"content-type": "text/plain"}),
])
def test_malformed_bodies_are_422(client, content, headers):
    response = client.post("/translate", content=content, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_oversized_bodies_are_413_declared_or_chunked(client):
    big = b'{"text": ["' + b"w" * (LIMITS.max_body_bytes + 1) + b'"]}'
    declared = client.post("/translate", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "over the limit" in declared.json()["detail"]
    chunked = client.post("/translate", content=iter([big[:1000], big[1000:]]),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert client.post("/translate", json={"text": ["w1"]}).status_code == 200


def test_health_info_and_openapi(client, loaded):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"].endswith("best.pt")
    info = client.get("/info").json()
    assert (info["name"], info["src_lang"], info["trg_lang"]) == ("toy", "xx", "yy")
    assert info["scores"]["validation"]["valid_bleu"] > 90
    assert info["recipe"]["model"]["emb_dim"] == 32 and info["decode"]["beam_size"] == 2
    assert info["limits"]["max_sentences"] == 8 and info["limits"]["max_batch"] == 4
    schema = client.get("/openapi.json").json()
    assert {"/translate", "/health", "/info"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["TranslateRequest"]
    assert request["required"] == ["text"] and "beam_size" in request["properties"]


def test_info_has_test_scores_from_evaluate_and_only_finite_numbers(loaded, tmp_path):
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(loaded.path, run / "checkpoints" / "best.pt")
    (run / "eval").mkdir()
    best = run / "checkpoints" / "best.pt"
    row = score("test", ["v1 v2 v3 v4 v5"], ["v1 v2 v3 v4 v5"])
    recipe_opts = SearchOptions.from_recipe(loaded.recipe.decode)
    add_to_report(run / "eval" / "report.json", [row], [best], recipe_opts)
    add_to_report(run / "eval" / "report.json", [score("test", ["x"], ["v1 v2"])], [best, best], recipe_opts)
    greedy = SearchOptions(**{**vars(recipe_opts), "beam_size": recipe_opts.beam_size + 1})
    add_to_report(run / "eval" / "report.json", [score("test", ["y"], ["v1 v2"])], [best], greedy)
    copy = load_model(best)
    copy.payload["metrics"] = {"valid_loss": float("nan"), "valid_ppl": float("inf"), "valid_bleu": 0.0}
    with TestClient(create_app(copy, LIMITS)) as c:
        info = c.get("/info").json()
    # only the served checkpoint alone, with the settings it decodes with
    shown = [(s["split"], s["bleu"], s["models"]) for s in info["scores"]["test"]]
    assert shown == [("test", 100.0, [str(best.resolve())])]
    assert info["scores"]["validation"] == {"valid_loss": None, "valid_ppl": None, "valid_bleu": 0.0}


def test_info_of_an_exported_model_has_the_scores_it_was_exported_with(loaded, tmp_path):
    from nmt.export import export_model, load_exported

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    best = run / "checkpoints" / "best.pt"
    import shutil

    shutil.copy(loaded.path, best)
    add_to_report(run / "eval" / "report.json", [score("test", ["v1 v2 v3 v4 v5"], ["v1 v2 v3 v4 v5"])], [best],
                  SearchOptions.from_recipe(loaded.recipe.decode))
    export_model(run, tmp_path / "exported")
    with TestClient(create_app(load_exported(tmp_path / "exported"), LIMITS)) as c:
        info = c.get("/info").json()
    assert [(s["split"], s["bleu"]) for s in info["scores"]["test"]] == [("test", 100.0)]


def test_after_shutdown_health_and_translate_are_503(loaded):
    api = create_app(loaded, LIMITS)
    with TestClient(api) as c:
        assert c.get("/health").status_code == 200
    stopped = TestClient(api)  # no lifespan: the worker stopped with the first client
    assert stopped.get("/health").status_code == 503
    response = stopped.post("/translate", json={"text": ["w1"]})
    assert response.status_code == 503 and "shutting down" in response.json()["detail"]


# ---------------------------------------------------------------------------- the CLI


def test_cli_flags_reach_the_server(trained_run, loaded, monkeypatch):
    import uvicorn

    seen = {}

    def fake_run(self, sockets):
        seen["address"] = sockets[0].getsockname()
        with TestClient(self.config.app) as c:
            seen["info"] = c.get("/info").json()
            seen["too_many"] = c.post("/translate", json={"text": ["w1"] * 4}).status_code
            seen["too_long"] = c.post("/translate", json={"text": ["w1 w2 w3"]}).status_code
            seen["ok"] = c.post("/translate", json={"text": ["w1", "w2 w3"]}).json()["translations"]
        seen["reference"] = reference(loaded, ["w1", "w2 w3"])

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    result = CliRunner().invoke(cli_app, [
        "serve", "--model", str(trained_run), "--host", "127.0.0.2", "--port", "0", "--max-batch", "3",
        "--max-wait-ms", "7", "--max-sentences", "3", "--max-chars", "6", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert seen["address"][0] == "127.0.0.2" and seen["address"][1] > 0
    limits = seen["info"]["limits"]
    assert (limits["max_batch"], limits["max_wait_ms"], limits["max_sentences"], limits["max_chars"]) == (3, 7, 3, 6)
    assert (seen["too_many"], seen["too_long"], seen["ok"]) == (413, 413, seen["reference"])


def test_cli_errors_are_one_line(trained_run, tmp_path, monkeypatch):
    runner = CliRunner()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    try:
        in_use = runner.invoke(cli_app, ["serve", "--model", str(trained_run), "--port", port])
    finally:
        busy.close()
    assert in_use.exit_code == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in in_use.output and "Traceback" not in in_use.output
    missing = runner.invoke(cli_app, ["serve", "--model", str(tmp_path / "nothing"), "--port", "0"])
    assert missing.exit_code == 1 and "error: " in missing.output and "no such checkpoint" in missing.output
    bad_flag = runner.invoke(cli_app, ["serve", "--max-batch", "0"])
    assert bad_flag.exit_code == 2
    monkeypatch.delitem(sys.modules, "nmt.serve")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    no_extra = runner.invoke(cli_app, ["serve", "--model", str(trained_run)])
    assert no_extra.exit_code == 1 and "pip install 'nmt[serve]'" in no_extra.output


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_serves_over_http_and_stops_on_ctrl_c(trained_run, loaded, inherited):
    """Ctrl-C stops the server gracefully with exit code 130, also when it was started
    with SIGINT ignored (a background job of a shell script, as `cmd &` runs it)."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "nmt", "serve", "--model", str(trained_run), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    try:
        url, log = None, []
        for line in server.stderr:
            log.append(line)
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
            if "Application startup complete" in line:
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), "".join(log)
        response = httpx.post(f"{url}/translate", json={"text": ["w1 w2", "w3"]}, timeout=60)
        assert response.json()["translations"] == reference(loaded, ["w1 w2", "w3"])
        assert httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok"
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 130
    assert out == ""  # logs, access log included, go to stderr
    assert '"POST /translate HTTP/1.1" 200' in err and "stopped" in err and "Traceback" not in err


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
any_text = st.text(st.characters(exclude_categories=()), max_size=45)
requests = st.fixed_dictionaries(
    {"text": st.lists(any_text, max_size=9) | json_values},
    optional={
        "beam_size": st.integers(-2, 40) | json_values,
        "length_penalty": st.floats() | json_values,
        "max_len_ratio": st.floats(-1, 12) | json_values,
        "nbest": st.integers(-1, 40) | json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests | json_values)
def test_any_json_gets_an_answer_or_a_json_error(client, body):
    response = client.post("/translate", content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code in (200, 413, 422), response.text
    answer = response.json()
    if response.status_code == 200:
        assert len(answer["translations"]) == len(body["text"])
    else:
        assert answer["detail"]
