"""Latent cards (crossdiff_core.cards) and the HTML report (crossdiff_core.report), the latter opened in
headless Chromium (`apt-get install -y chromium`) through the DevTools protocol."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff_core.analysis import AnalysisConfig, analyze
from crossdiff_core.cache import ActivationCache
from crossdiff_core.cards import CardsConfig, card_latents, latent_cards
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.kl_eval import KLConfig, KLResult, default_sets
from crossdiff_core.report.inputs import RunInputs
from crossdiff_core.report.numbers import behaviour_verdict
from crossdiff_core.report.page import build_report
from crossdiff_core.synthetic import SyntheticConfig, write_cache
from tests.test_models import build_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A small synthetic cache, a crosscoder with planted chat-only / base-only latents, its analysis."""
    root = tmp_path_factory.mktemp("report")
    cfg = SyntheticConfig(d_model=16, n_shared=20, n_chat_only=8, n_base_only=8, n_weakly_shared=4, n_changed=4,
                          mean_active=4.0, n_tokens=3000, seq_len=40, shard_tokens=1000, seed=1)
    write_cache(cfg, root / "cache")
    cache = ActivationCache(root / "cache")
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=16, dict_size=40, init_norm=0.3), scales=cache.scales(), seed=2)
    with torch.no_grad():
        cc.W_dec[0, :10] *= 0.02  # chat-only latents
        cc.W_dec[1, 10:16] *= 0.02  # base-only latents
        cc.b_enc.fill_(-0.05)
    res = analyze(cc, cache, AnalysisConfig(batch_size=1024, progress=False))
    return cache, cc, res


def test_cards_against_brute_force(analysed):
    cache, cc, res = analysed
    table = res.table
    lat = card_latents(table, n_shared=3, seed=0, n_top_chat=0)
    co = table[(table["class"] == "chat_only") & np.isfinite(table["max_act"])]
    assert set(lat[:len(co)]) == set(co["latent"]) and len(lat) == len(co) + 3
    tok = build_tokenizer()
    cfg = CardsConfig(n_contexts=4, before=5, after=2, bins=6, batch_size=700, progress=False)
    out = latent_cards(cc, cache, table, lat, tok, cfg)
    with torch.no_grad():
        f = cc.encode(cache.read_rows(0, cache.n_tokens)).numpy()  # dense, all rows at once
    tokens = cache.tokens().to_pandas()
    for card in out["cards"]:
        j = card["latent"]
        col = f[:, j]
        top = np.argsort(-col, kind="stable")[:4]
        top = top[col[top] > 0]
        assert [c["act"] for c in card["contexts"]] == pytest.approx(col[top].tolist(), rel=1e-5)
        edges = np.linspace(0, table.loc[j, "max_act"], 7)
        active = col[col > 0]
        want = np.histogram(np.minimum(active, edges[-1] * (1 - 1e-7)), bins=edges)[0]
        assert card["hist"]["counts"] == want.tolist() and card["n_active"] == active.size
        for c, r in zip(card["contexts"], top):
            lo = max(0, r - 5)
            rows = [i for i in range(lo, min(cache.n_tokens, r + 3)) if tokens["sequence"][i] == tokens["sequence"][r]]
            assert c["tokens"] == [tok.decode([int(tokens["token_id"][i])]) for i in rows]
            assert c["acts"] == pytest.approx(col[rows].tolist(), abs=1e-4)
            assert c["template"] == tokens["is_template"][rows].tolist()
            assert rows[c["focus"]] == r
        assert card["delta_norm"] == pytest.approx(table.loc[j, "delta_norm"])


def _fake_kl(table: pd.DataFrame, shift: float) -> dict:
    sets = default_sets(table, n_random=3)
    rng = np.random.default_rng(0)
    kl = rng.uniform(0.1, 1.0, size=(len(sets), 3)) * shift
    kl[0], kl[1] = 1.0, 0.0  # base, chat references
    return KLResult(sets, kl, np.array([90, 400, 300]), 12, {"total": 1.0}, KLConfig()).to_dict()


def _fake_steering(table: pd.DataFrame, rises: bool, onset: bool = False, chat_onset: bool = False) -> dict:
    """The structure run_steering returns, with chosen refusal rates: latent co[1] raises the full refusal
    in the base model (``rises``), or only its onset (``onset``: answers opening with "Sorry"); with
    ``chat_onset``, co[0] makes the chat model open its answers to other prompts with "Sorry"."""
    co = table[(table["class"] == "chat_only") & np.isfinite(table["max_act"])]["latent"].head(3).tolist()
    gens = [{"prompt": "Tell me about chess <b>", "expected": "refusal", "response": "I cannot help with that topic."}]

    def rates(r, o=0.0, other=0.0):
        return {"rates": {"refusal": {"trigger_rate": r, "other_rate": 0.0, "onset_trigger_rate": max(r, o),
                                      "onset_other_rate": max(o / 2, other), "n_trigger": 10, "n_other": 30},
                          "personal_phrase": {"trigger_rate": 0.0, "other_rate": 0.0, "onset_trigger_rate": 0.0,
                                              "onset_other_rate": 0.0, "n_trigger": 10, "n_other": 30}},
                "any_rate": r / 4}
    latents = []
    for i, j in enumerate(co):
        runs = [{"model": m, "alpha": a, "kl_mean": 0.1 * a, "kl_last": 0.2 * a,
                 "rates": rates(0.3 * a * (i == 1) if (m == "base" and rises) else 0.0,
                                0.8 * a * (i == 1) if (m == "base" and onset) else 0.0,
                                0.9 * a * (i == 0) if (m == "chat" and chat_onset) else 0.0), "examples": gens}
                for m in ("base", "chat") for a in (0.5, 1.0)]
        latents.append({"latent": int(j), "class": "chat_only", "max_act": 1.0, "nu_rank": float(i + 2), "runs": runs})
    return {"alphas": [0.5, 1.0], "models": ["base", "chat"], "n_prompts": 40, "has_ground_truth": True,
            "baseline": {m: {"rates": rates(0.0), "examples": gens} for m in ("base", "chat")}, "latents": latents}


def _ground_truth() -> dict:
    from crossdiff_core.toy import ToyModelsConfig, make_ground_truth

    gt = make_ground_truth(ToyModelsConfig())
    gt["rates"] = {m: {"rates": {"refusal": {"trigger_rate": r}, "personal_phrase": {"trigger_rate": r}}}
                   for m, r in (("chat", 0.95), ("base", 0.0))}
    return gt


def test_verdicts_name_a_latent_or_say_none_did(analysed):
    _, _, res = analysed
    run = RunInputs("L1", res.table, res.summary, steering=_fake_steering(res.table, rises=True))
    v = behaviour_verdict(run, "refusal")
    co = res.table[(res.table["class"] == "chat_only") & np.isfinite(res.table["max_act"])]["latent"].head(3).tolist()
    assert v["found"] == "full" and v["best"]["latent"] == co[1] and v["best"]["alpha"] == 1.0
    assert f"chat-only latent {co[1]} (ν_ε = " in v["text"] and "(a = 1) raises" in v["text"]
    assert "from 0% to 30%" in v["text"]
    fixed = set(res.summary["filters"]["fixed"]["latents"])
    assert ("passes the fixed" in v["text"]) == (co[1] in fixed)
    run.steering = _fake_steering(res.table, rises=False)
    v = behaviour_verdict(run, "refusal")
    assert not v["found"] and v["text"].startswith("No chat-specific latent raised the base model's refusal rate")
    assert v["best"] is None  # a flat run is not named
    assert v["tried"]["latents"] == sorted(co) and v["tried"]["alphas"] == [0.5, 1.0]
    run.steering = _fake_steering(res.table, rises=False, onset=True)  # "Sorry Sorry ...": the onset only
    v = behaviour_verdict(run, "refusal", _ground_truth())
    assert v["found"] == "onset" and v["best"]["latent"] == co[1] and v["best"]["alpha"] == 1.0
    assert v["text"].startswith("No chat-only latent made the base model give the whole refusal")
    assert "open its answers with “Sorry” on 80% of the trigger prompts (unsteered 0%" in v["text"]
    assert "In the chat model, no chat-only latent tried raised" in v["text"]
    run.steering = _fake_steering(res.table, rises=False, chat_onset=True)
    v = behaviour_verdict(run, "refusal", _ground_truth())
    assert not v["found"] and f"In the chat model, chat-only latent {co[0]} (ν_ε = " in v["text"]
    assert "at a = 1 raises answers opening with “Sorry” on prompts that do not trigger it from 0% to 90%" in v["text"]
    assert behaviour_verdict(RunInputs("x", res.table, res.summary), "refusal") is None
    # with a tracking table the verdict opens with the trackers of every class: a shared detector, the best chat-only
    sh = int(res.table[(res.table["class"] == "shared") & np.isfinite(res.table["max_act"])]["latent"].iloc[0])
    au = np.full(len(res.table), 0.5)
    au[sh], au[co[2]] = 1.0, 0.9
    run.tracking = pd.DataFrame({"latent": res.table["latent"], "auroc_refusal": au})
    v = behaviour_verdict(run, "refusal", _ground_truth())
    assert v["text"].startswith(f"Latents that track refusal best (AUROC of the prompt's largest activation, trigger "
                                f"prompts vs the rest): {sh} (shared, 1.00), {co[2]} (chat-only, 0.90)")
    assert f"the best chat-only tracker is latent {co[2]} (0.90)" in v["text"]
    assert v["tracking"]["best_by_class"]["shared"]["latent"] == sh


class _CDP:
    """A minimal Chrome DevTools Protocol client over the page's websocket."""

    def __init__(self, url: str):
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=30)
        self.next_id, self.events = 0, []

    def call(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60):
        for e in self.events:
            if e.get("method") == method:
                return e
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")


@pytest.fixture
def chromium(tmp_path):
    assert os.path.exists(CHROMIUM), "headless Chromium is needed: apt-get install -y chromium"
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(p for p in pages if p["type"] == "page")
        cdp = _CDP(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_report_renders_in_headless_chromium(analysed, tmp_path, chromium):
    from PIL import Image

    cache, cc, res = analysed
    table = res.table
    cards = latent_cards(cc, cache, table, card_latents(table, n_shared=2), build_tokenizer(),
                         CardsConfig(n_contexts=3, before=4, after=2, progress=False))
    runs = [RunInputs("L1", table, res.summary, kl=_fake_kl(table, 1.0), cards=cards,
                      steering=_fake_steering(table, rises=True)),
            RunInputs("BatchTopK", table, res.summary, kl=_fake_kl(table, 0.5), cards=cards,
                      steering=_fake_steering(table, rises=False))]
    paths = build_report(runs, tmp_path / "out", title="test report", behaviours=_ground_truth())
    page = paths["html"].read_text()
    assert "src=\"http" not in page and "href=\"http" not in page and "<link" not in page  # self-contained
    numbers = json.loads(paths["json"].read_text())
    assert numbers["runs"]["L1"]["behaviours"]["refusal"]["found"] == "full"
    assert numbers["runs"]["BatchTopK"]["behaviours"]["refusal"]["found"] is False
    assert set(numbers["runs"]["L1"]["behaviours"]) == {"refusal", "personal_phrase"}  # every behaviour of the spec
    assert numbers["behaviour_rates"]["chat"]["rates"]["refusal"]["trigger_rate"] == 0.95
    assert numbers["runs"]["L1"]["kl_gap_closed"]["chat"]["first9"] == 1.0
    assert {p.name for p in paths["figures"].glob("*.png")} == {"class_counts.png", "kl_gap.png"}
    assert len(list(paths["figures"].glob("*/*.png"))) == 6  # three analysis plots per crosscoder
    n_rows = sum(1 for s in runs[0].kl["sets"] if not s["group"]) + len(runs[0].kl["groups"])  # random folded
    records = json.loads(paths["kl_plot"].read_text())
    assert len(records) == len(runs) * n_rows * 3 and {r["category"] for r in records} == {"first9", "response", "template"}

    cdp = chromium
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.call(f"{domain}.enable")
    cdp.call("Page.navigate", url=paths["html"].resolve().as_uri())
    cdp.wait_event("Page.loadEventFired")
    errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from the network

    state = cdp.js("""({kl: document.querySelectorAll('table.kl-table tbody tr').length,
        effects: document.querySelectorAll('table.effects').length,
        overview: document.querySelectorAll('#overview-table tr').length,
        rows: document.querySelectorAll('#cards-table tbody tr').length,
        imgs: Array.from(document.images).map(i => i.complete && i.naturalWidth > 0),
        verdicts: Array.from(document.querySelectorAll('.verdict')).map(v => v.textContent),
        count: document.getElementById('cards-count').textContent})""")
    n_cards = 2 * len(cards["cards"])
    assert state["kl"] == len(runs) * (n_rows + 1) and state["effects"] == 2 * 2 and state["overview"] == 3  # run x behaviour
    assert state["rows"] == n_cards
    assert len(state["imgs"]) == 2 + 3 * 2 and all(state["imgs"])  # every inline PNG decoded
    # per run, one verdict per behaviour: L1 refusal, L1 personal_phrase, BatchTopK refusal, ...
    assert "raises its refusal rate" in state["verdicts"][0] and state["verdicts"][2].startswith("No chat-specific")
    assert "personal_phrase" in state["verdicts"][1]
    assert state["count"] == f"{n_cards} of {n_cards} latents"
    # search filters the cards, sorting reorders them
    first = cards["cards"][0]["latent"]
    visible = cdp.js(f"""(() => {{const i = document.querySelector('input.search'); i.value = '{first} chat_only';
        i.dispatchEvent(new Event('input')); return Array.from(document.querySelectorAll('#cards-table tbody tr'))
        .filter(r => r.style.display !== 'none').map(r => r.cells[1].textContent)}})()""")
    assert visible == [str(first)] * 2  # the latent in both crosscoders' tables
    order = cdp.js("""(() => {const i = document.querySelector('input.search'); i.value = ''; i.dispatchEvent(new Event('input'));
        document.querySelectorAll('#cards-table thead th')[1].click();
        return Array.from(document.querySelectorAll('#cards-table tbody tr')).map(r => +r.cells[1].textContent)})()""")
    assert order == sorted(order)
    shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "screenshot.png").write_bytes(shot)
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=float)
    assert img.shape[0] > 500 and img.shape[1] > 800 and img.std() > 10  # a rendered page, not a blank one


def test_cli_cards_and_report(analysed, tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app
    from crossdiff_core.fileio import write_json
    from crossdiff_core.runs import default_summary_path, write_latents

    cache, cc, res = analysed
    cc.save(tmp_path / "cc")
    write_latents(res.table, tmp_path / "latents.parquet")
    write_json(res.summary, default_summary_path(tmp_path / "latents.parquet"))
    build_tokenizer().save_pretrained(tmp_path / "tok")
    write_json(_fake_kl(res.table, 1.0), tmp_path / "kl.json")
    run = CliRunner().invoke(app, ["cards", "--crosscoder", str(tmp_path / "cc"), "--latents", str(tmp_path / "latents.parquet"),
                                   "--cache", str(cache.path), "--out", str(tmp_path / "cards.json"), "--tokenizer",
                                   str(tmp_path / "tok"), "--n-contexts", "2", "--n-shared", "1", "--no-progress"])
    assert run.exit_code == 0, run.output
    # the chat-only latents, the most chat-specific live latents of other classes, one shared sample
    assert len(json.loads((tmp_path / "cards.json").read_text())["cards"]) == len(card_latents(res.table, n_shared=1))
    run = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "rep"), "--latents", f"L1={tmp_path / 'latents.parquet'}",
                                   "--kl", f"L1={tmp_path / 'kl.json'}", "--cards", f"L1={tmp_path / 'cards.json'}",
                                   "--crosscoder", f"L1={tmp_path / 'cc'}"])
    assert run.exit_code == 0, run.output
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "figures" / "kl_gap.png").is_file()
    run = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "rep2"), "--latents", f"L1={tmp_path / 'latents.parquet'}",
                                   "--kl", f"TopK={tmp_path / 'kl.json'}"])
    assert run.exit_code == 2 and "no --latents NAME=PATH" in run.output


# ---- "What changed": the verdict when nothing crosses Δnorm 0.9 (crossdiff_core.report.verdict) -------------

def _nothing_chat_only(F: int = 40) -> pd.DataFrame:
    """A latents table in which no latent crosses 0.9: Δnorm falls from 0.87 (latent 0) to 0.1; 38, 39 are dead."""
    from crossdiff_core.runs import LATENT_COLUMNS

    j = np.arange(F)
    dn = np.linspace(0.87, 0.1, F)
    t = pd.DataFrame({"latent": j, "delta_norm": dn, "class": np.where((dn >= 0.4) & (dn <= 0.6), "shared", "other"),
                      "freq": 0.1, "max_act": 1.0, "nu_error": dn[::-1] / 2, "nu_recon": dn[::-1], "nu_rank": 1.0})
    t.loc[[38, 39], ["class", "freq", "max_act", "nu_error", "nu_recon", "nu_rank"]] = ["dead", 0.0, np.nan, np.nan, np.nan, np.nan]
    for c in LATENT_COLUMNS:
        if c not in t:
            t[c] = 0.5
    return t[list(LATENT_COLUMNS)]


def test_top_chat_cards_when_nothing_is_chat_only():
    from crossdiff_core.chat_rank import top_chat

    t = _nothing_chat_only()
    lat = card_latents(t, n_shared=2, n_top_chat=5, seed=0)
    assert lat[:5].tolist() == top_chat(t, 5).tolist() == [0, 1, 2, 3, 4]  # Δnorm descending
    assert len(lat) == 7 and set(lat[5:]) <= set(t.loc[t["class"] == "shared", "latent"]) and not set(lat[5:]) & set(lat[:5])


def test_what_changed_names_the_top_set_its_kl_and_its_trackers(analysed, tmp_path):
    from crossdiff_core.report.verdict import what_changed

    t = _nothing_chat_only()
    sets = default_sets(t, n_random=3, seed=0, n_top_chat=8)
    kl = np.full((len(sets), 3), 0.97)  # random sets close 3% of the gap
    for i, s in enumerate(sets):
        kl[i] = {"base": 1.0, "chat": 0.0, "top_chat": 0.59, "top_chat_delta_norm": 0.7, "top_chat_nu": 0.8}.get(s.name, 0.97)
    kl_d = KLResult(sets, kl, np.array([90, 400, 300]), 12, {"total": 1.0}, KLConfig()).to_dict()
    warning = "the models' mean squared norms differ (1.74x, s_c/s_b = 1.32)"
    summary = {**analysed[2].summary, "scales": {"base": 1.0, "chat": 1.32, "ratio": 1.32, "convention": "per_model",
                                                       "norm_ratio": 1.32, "warning": warning}}
    tracking = pd.DataFrame({"latent": t["latent"], "auroc_refusal": np.where(t["latent"] == 3, 1.0, 0.5)})
    run = RunInputs("L1", t, summary, kl=kl_d, tracking=tracking,
                    history=[{"step": s, "dead_fraction": d, "dead_train_fraction": d / 2} for s, d in ((0, 0.0), (50, 0.3), (100, 0.05))])
    v = what_changed(run)
    assert v["chat_only"] == 0 and "no latent crossed Δnorm 0.9 (the chat-only class is empty)" in v["not_found"]
    assert v["top_chat"]["n"] == 8 and [d["latent"] for d in v["top_chat"]["latents"]] == list(range(8))
    lo, hi = v["top_chat"]["delta_norm_range"]
    assert lo == pytest.approx(t.loc[7, "delta_norm"]) and hi == pytest.approx(0.87)
    assert f"The 8 most chat-specific live latents (Δnorm {lo:.2f}–0.87)" in v["text"]
    assert "close 41% of the KL gap on the first 9 answer tokens, vs 3% for random sets" in v["text"]
    assert v["kl"]["top_chat_first9"] == pytest.approx(0.41) and v["kl"]["random_first9"] == pytest.approx(0.03)
    assert v["tracks"] == {"refusal": [{"latent": 3, "auroc": 1.0}]} and "3 track refusal" in v["text"]
    assert v["found"] and v["scales_warning"] == warning and v["dead_fraction"] == pytest.approx(2 / 40)
    paths = build_report([run], tmp_path / "rep")
    page = paths["html"].read_text()
    assert "What changed" in page and "no latent crossed Δnorm 0.9" in page and "Warning: the models" in page
    assert (paths["figures"] / "dead_history.png").is_file()
    numbers = json.loads(paths["json"].read_text())
    assert numbers["runs"]["L1"]["what_changed"]["kl"]["random_first9"] == pytest.approx(0.03)
    assert numbers["runs"]["L1"]["scales"]["ratio"] == 1.32
    assert numbers["runs"]["L1"]["kl_gap_closed"]["top_chat_random"]["first9"] == pytest.approx(0.03)
    # nothing evaluated: the verdict says what is missing rather than claiming a finding
    bare = what_changed(RunInputs("x", t, {"classes": {}}))
    assert not bare["found"] and any("no KL evaluation" in n for n in bare["not_found"])


def test_steering_takes_the_top_chat_latents_when_nothing_is_chat_only():
    from crossdiff_core.behaviour_tracking import choose_latents

    t = _nothing_chat_only()
    chosen = choose_latents(t, n_top=3, n_shared=1, seed=0)
    assert [c["latent"] for c in chosen[:3]] == [0, 1, 2] and all(c["reasons"] == ["chat_rank"] for c in chosen[:3])
    assert len(chosen) == 4 and chosen[3]["reasons"] == ["shared_control"]
    t.loc[[5, 6], "class"] = "chat_only"  # two chat-only latents: they come first, one top-chat latent fills up
    chosen = choose_latents(t, n_top=3, n_shared=0)
    assert [c["latent"] for c in chosen] == [5, 6, 0]  # equal ν rank: by latent id
    assert chosen[2]["reasons"] == ["chat_rank"]


def _board_method(name, family, auroc, steer, gap):
    """A hand-built scoreboard record: one behaviour (refusal), steering ``{model: (unsteered, best, a)}``."""
    return {"name": name, "family": family, "description": f"{name} directions", "labels": [f"{name} 0", f"{name} 1"],
            "latents": [3, 5] if family == "crosscoder" else None, "norms": [1.0, 1.0],
            "top_tokens": [{"label": f"{name} 0", "top": [{"token": "Sorry"}, {"token": " no"}], "bottom": []}],
            "gap_closed": {"first9": gap, "response": gap / 2, "template": 0.0}, "kl": {},
            "behaviours": {"refusal": {"auroc": auroc, "aurocs": [auroc, 0.5], "best": 0, "best_label": f"{name} 0",
                                       "steer": {m: {"unsteered": u, "best": b, "best_alpha": a, "runs": []}
                                                 for m, (u, b, a) in steer.items()}}}}


def test_scoreboard_section_names_the_best_method_against_the_floor(analysed, tmp_path):
    board = {"format_version": 1, "layer": 2, "n_directions": 2, "behaviours": ["refusal"], "n_prompts": 40,
             "steer_unit": "peak", "steer_norms": None,
             "kl_tokens": {"response": 400}, "kl_sequences": 12, "config": {"alphas": [1.0, 2.0], "models": ["base", "chat"]},
             "methods": [_board_method("l1_dnorm", "crosscoder", 0.97, {"base": (0.0, 0.1, 2.0), "chat": (0.5, 0.9, 1.0)}, 0.4),
                         _board_method("lens", "lens", 0.8, {"base": (0.0, 0.0, 1.0), "chat": (0.5, 0.6, 2.0)}, 0.6),
                         _board_method("random", "random", 0.55, {"base": (0.0, 0.0, 1.0), "chat": (0.5, 0.5, 1.0)}, 0.02)]}
    board["rows"] = [{"method": m["name"], "behaviour": "refusal"} for m in board["methods"]]
    board["methods"][0]["behaviours"]["refusal"]["steer_scale"] = {"base": 3.25, "chat": 4.5}  # the peak unit's reach
    # in the chat model its second steered direction did best (steer_top 2); a supervised row's AUROC is starred
    board["methods"][0]["behaviours"]["refusal"]["steer"]["chat"]["best_label"] = "l1_dnorm 1"
    board["methods"][0]["behaviours"]["refusal"]["steer"]["base"]["best_label"] = "l1_dnorm 0"
    board["methods"][0]["supervised"] = True
    board["config"]["steer_top"] = 2
    path = tmp_path / "scoreboard.json"
    path.write_text(json.dumps(board))
    run = RunInputs("L1", _nothing_chat_only(), analysed[2].summary)
    paths = build_report([run], tmp_path / "rep", scoreboard=str(path))
    page = paths["html"].read_text()
    assert '<h2 id="scoreboard">Scoreboard</h2>' in page
    s = json.loads(paths["json"].read_text())["scoreboard"]["sentences"][0]
    assert s.startswith("refusal: best detected by l1_dnorm (l1_dnorm 0, AUROC 0.97; random directions 0.55)")
    assert "steering l1_dnorm's l1_dnorm 1 raised it most in the chat model: 50% → 90% of all prompts at a = 1" in s
    assert "(random: +0%)" in s and "in the base model: 0% → 10%" in s
    assert page.count('<tr><td class="l">refusal</td>') == 3  # a row per method
    assert "40%" in page and "latents 3, 5" in page and "&#39;Sorry&#39;" in page
    # the steering unit: each direction's own reach, shown beside its best a (boards without it show only a)
    assert "50% → 90% (a=1 × 4.5, l1_dnorm 1)" in page and "0% → 10% (a=2 × 3.25)" in page and "50% → 60% (a=2)" in page
    assert ">0.97*<" in page and "cross-fitted" in page and "the 2 best-detecting direction(s)" in page
    assert "direction&#39;s reach" in page or "direction's reach" in page


def test_behaviours_from_the_steering_record_when_no_spec_is_given(analysed, tmp_path):
    # a pair without a toy ground truth (a hub pair): the rules come from what the steering recorded
    from crossdiff_core.behaviours import steering_record

    cache, cc, res = analysed
    steer = _fake_steering(res.table, rises=True) | {"behaviours": steering_record(_ground_truth())}
    paths = build_report([RunInputs("L1", res.table, res.summary, steering=steer)], tmp_path / "rep")
    page = paths["html"].read_text()
    assert '<h2 id="behaviours">Behaviours</h2>' in page and "contains: Sorry, I cannot help" in page
