"""Drives ragd's chat page in headless Chromium over the DevTools protocol.

Usage: check.py BASE_URL [CHROMIUM]. Opens BASE_URL/ once the models are
ready (the page's loading banner gone), checks the documents list, asks a
question, and checks that the answer streams in (the answer box changes
several times before the page says it is done), that numbered sources appear
with the evidence of the cited ones marked, and that a source's text opens;
asks a follow-up (sent with the conversation so far), summarises a document
from its button, deletes one, and opens the page in Chinese. Screenshots go to
TARGET/screenshots/ (CARGO_TARGET_DIR or the repository's target/), their
paths printed. Exits non-zero with the reason otherwise.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client

base = sys.argv[1]
chromium = sys.argv[2] if len(sys.argv) > 2 else (shutil.which("chromium") or "chromium")
profile = tempfile.mkdtemp(prefix="ragd-chromium-")
proc = subprocess.Popen(
    [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*", "--user-data-dir=" + profile, "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    port = None
    deadline = time.time() + 60
    while port is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("chromium exited before it listened")
        m = re.search(r"DevTools listening on ws://[^:/]+:(\d+)/", line)
        if m:
            port = int(m.group(1))
    if port is None:
        raise SystemExit("chromium did not start its DevTools endpoint")
    targets = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port))
    page = next(t for t in targets if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
    next_id = [0]

    def call(method, **params):
        next_id[0] += 1
        ws.send(json.dumps({"id": next_id[0], "method": method, "params": params}))
        while True:
            reply = json.loads(ws.recv())
            if reply.get("id") == next_id[0]:
                if "error" in reply:
                    raise SystemExit("%s: %s" % (method, reply["error"]))
                return reply.get("result", {})

    def js(expression):
        r = call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise SystemExit("page script failed: %s" % r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(expression, seconds, what):
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise SystemExit("timed out waiting for " + what)

    shots = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "target"), "screenshots")
    os.makedirs(shots, exist_ok=True)

    def screenshot(name):
        call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        data = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = os.path.abspath(os.path.join(shots, name))
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    call("Page.enable")
    call("Page.navigate", url=base + "/?lang=en")
    wait_for('document.readyState === "complete" && !!document.getElementById("question")', 30, "the page")
    wait_for('document.body.dataset.ready === "yes"', 60, "the page to see the models ready")
    listed = wait_for('(() => { const ids = [...document.querySelectorAll("#documents li")].map(li => li.dataset.document).filter(Boolean); return ids.length >= 3 && ids; })()', 30, "the documents list")
    for wanted in ("cats", "rust", "everest"):
        if wanted not in listed:
            raise SystemExit("documents list: %s" % listed)
    # The sources panel: the test's folder source and its first sync.
    last_sync = wait_for('(() => { const li = document.querySelector("#source-list li[data-source=notes]"); return li && li.querySelector(".last-sync").textContent; })()', 30, "the sources panel")
    if "1 new" not in last_sync:
        raise SystemExit("the source's last sync: %r" % last_sync)
    # Record what the page sends, to see the conversation go with a follow-up.
    js('''window.__sent = [];
          const realFetch = window.fetch;
          window.fetch = (url, init) => {
            if (init && init.body && typeof init.body === "string") window.__sent.push({url: String(url), body: JSON.parse(init.body)});
            return realFetch(url, init);
          }; true''')
    # Count the answer box's changes while the page is still answering.
    js('''window.__partial = 0;
          new MutationObserver(() => {
            const answer = document.getElementById("answer");
            if (document.body.dataset.state === "asking" && answer && answer.textContent)
              window.__partial++;
          }).observe(document.getElementById("conversation"), {childList: true, characterData: true, subtree: true});
          document.getElementById("question").value = "How long does an adult cat sleep each day?";
          document.getElementById("ask").click(); true''')
    state = wait_for('["done", "error"].includes(document.body.dataset.state) && document.body.dataset.state', 180, "the answer")
    answer = js('document.getElementById("answer").textContent')
    if state != "done":
        raise SystemExit("the page shows an error: " + answer)
    partial = js("window.__partial")
    sources = js('Array.from(document.querySelectorAll("#sources li")).map(li => li.dataset.document)')
    if not answer.strip():
        raise SystemExit("empty answer")
    if partial < 2:
        raise SystemExit("the answer did not stream in (%d partial updates)" % partial)
    if "cats" not in sources:
        raise SystemExit("sources: %s" % sources)
    # Open the first source's text.
    js('(() => { const li = [...document.querySelectorAll("#sources li")].find(l => l.dataset.document === "cats"); li.querySelector("details").open = true; return true; })()')
    text = wait_for('(() => { const li = [...document.querySelectorAll("#sources li")].find(l => l.dataset.document === "cats"); return li.querySelector(".text").textContent; })()', 30, "the source text")
    if "purr" not in text:
        raise SystemExit("source text: " + text)
    status = js('document.getElementById("status").textContent')
    kind = js('document.getElementById("kind").dataset.kind')
    if kind not in ("generated", "extractive", "declined"):
        raise SystemExit("no answer kind shown: %r" % kind)
    # The evidence: each supported sentence marks a sentence of its passage.
    evidence = js('''(() => {
        const d = window.__lastDone;
        const backed = (d.grounding ? d.grounding.sentences : []).filter(s => s.supported && s.passage).map(s => s.passage);
        const marked = [...document.querySelectorAll("#sources li")].filter(li => li.querySelector("mark")).map(li => li.value);
        return {backed, marked};
    })()''')
    if evidence["backed"] and not set(evidence["backed"]) & set(evidence["marked"]):
        raise SystemExit("no evidence marked: %s" % evidence)
    shot_answer = screenshot("page-answer.png")
    # A follow-up question (in Chinese: the status in Chinese) goes with the
    # conversation so far.
    js('''document.body.dataset.state = "";
          document.getElementById("question").value = "猫每天睡多少个小时？";
          document.getElementById("ask").click(); true''')
    wait_for('["done", "error"].includes(document.body.dataset.state)', 180, "the Chinese answer")
    zh_status = js('document.getElementById("status").textContent')
    if not any("\u4e00" <= c <= "\u9fff" for c in zh_status):
        raise SystemExit("the status of a Chinese question is not in Chinese: %r" % zh_status)
    sent = js('window.__sent.filter(s => s.url.endsWith("/ask")).map(s => s.body)')
    if len(sent) != 2 or sent[0].get("history") or len(sent[1].get("history") or []) != 2:
        raise SystemExit("the follow-up did not carry the conversation: %s" % sent)
    if js('document.querySelectorAll("#conversation .turn").length') != 2:
        raise SystemExit("the conversation does not show both turns")
    # A document's summary from its button.
    js('''document.body.dataset.state = "";
          document.querySelector('#documents li[data-document="cats"] button.summarize').click(); true''')
    state = wait_for('["done", "error"].includes(document.body.dataset.state) && document.body.dataset.state', 180, "the summary")
    summary = js('document.getElementById("answer").textContent')
    summary_kind = js('document.getElementById("kind").dataset.kind')
    if state != "done" or not summary.strip() or summary_kind not in ("generated", "declined"):
        raise SystemExit("summary: %s %r %r" % (state, summary_kind, summary))
    if not js('window.__sent.some(s => s.url.endsWith("/summarize") && s.body.document_id === "cats")'):
        raise SystemExit("the summary was not asked of /summarize")
    # Delete a document from the list.
    js('''window.__noConfirm = true;
          document.querySelector('#documents li[data-document="rust"] button.delete').click(); true''')
    wait_for('![...document.querySelectorAll("#documents li")].some(li => li.dataset.document === "rust")', 30, "the deleted document to leave the list")
    shot_summary = screenshot("page-summary.png")
    # The interface in Chinese.
    call("Page.navigate", url=base + "/?lang=zh")
    wait_for('document.readyState === "complete" && document.body.dataset.ready === "yes"', 60, "the Chinese page")
    zh_ui = js('[document.documentElement.lang, document.getElementById("ask").textContent, document.querySelector("[data-i18n=documents]").textContent]')
    if zh_ui[0] != "zh" or not all(any("\u4e00" <= c <= "\u9fff" for c in t) for t in zh_ui[1:]):
        raise SystemExit("the Chinese interface: %s" % zh_ui)
    wait_for('document.querySelectorAll("#documents li[data-document]").length === 2', 30, "the Chinese page's documents")
    # Re-sync the source from its button: nothing changed.
    wait_for('!!document.querySelector("#source-list li[data-source=notes] button.sync")', 30, "the Chinese sources panel")
    js('document.querySelector("#source-list li[data-source=notes] button.sync").click(); true')
    resynced = wait_for('(() => { const t = document.querySelector("#source-list li[data-source=notes] .last-sync").textContent; return t.includes("未变 1") && t; })()', 60, "the re-sync")
    shot_zh = screenshot("page-zh.png")
    print(json.dumps({"answer": answer, "kind": kind, "partial_updates": partial, "sources": sources,
                      "evidence": evidence, "status": status, "zh_status": zh_status,
                      "summary": summary, "summary_kind": summary_kind,
                      "source_last_sync": last_sync, "source_resynced": resynced,
                      "screenshots": [shot_answer, shot_summary, shot_zh]}, ensure_ascii=False))
finally:
    proc.kill()
    shutil.rmtree(profile, ignore_errors=True)
